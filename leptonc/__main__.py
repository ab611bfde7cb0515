from leptonc.cli import main

main()
