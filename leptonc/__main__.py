from leptonc.cli import main

if __name__ == "__main__":  # a guard, so that a process that multiprocessing spawns does not run the CLI again
    main()
