"""Build the calibration text and the two non-WikiText tuning splits shipped in leptonc/data/, from sources
that are neither evaluation text (CPython's docs and standard library, WikiText-2 `valid.txt` from character
800,000) nor each other's:

  calibration.txt   four domains, cut into chunks of about CHUNK_CHARS characters (ended on a line boundary)
                    and interleaved evenly, so that every prefix (the 16 sequences AWQ reads, the 8 of the
                    layer sensitivity, the 128 of GPTQ) mixes them:
                      prose  WikiText-2 `valid.txt` [0, WIKI_CHARS) (CC BY-SA 3.0)
                      book   The Rust Programming Language, chapters BOOK_CALIB (MIT OR Apache-2.0; the HTML
                             rustup installs, as text)
                      api    Node.js API reference, NODE_CALIB (MIT; Debian's nodejs docs, Markdown)
                      code   Python source of CODE_CALIB: click, jinja2 (BSD-3-Clause), attrs, rich (MIT),
                             requests (Apache-2.0) from the virtual environment
  tuning_docs.txt   The Rust book chapters BOOK_TUNING and the Node.js API pages NODE_TUNING (not in calibration)
  tuning_code.txt   Python source of CODE_TUNING: networkx (BSD-3-Clause), pygments (BSD-2-Clause), PyYAML,
                    tomlkit (MIT); packages calibration does not read
The WikiText tuning split is `heldout.txt` (`valid.txt` [400174, 460000)), as before.

Deterministic for the same package versions; the files are committed, so other versions only matter when
rebuilding them.

    .venv/bin/python bench/calib_texts.py          # rewrites leptonc/data/{calibration,tuning_docs,tuning_code}.txt
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
BOOK = "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book"
NODE = "/usr/share/doc/nodejs/api"

WIKI_CHARS = 42_000  # ends at character 41,247 (a line boundary)
CHUNK_CHARS = 1_000
BOOK_CALIB = ("ch03-01-variables-and-mutability", "ch03-02-data-types", "ch04-01-what-is-ownership",
              "ch05-01-defining-structs", "ch06-02-match", "ch08-02-strings", "ch09-02-recoverable-errors-with-result")
BOOK_CHARS = 5_000  # from each chapter
NODE_CALIB = ("events", "stream", "fs")
NODE_CHARS = 7_500  # from each page (HTML comments and link definitions dropped)
CODE_CALIB = ("click/core.py", "jinja2/lexer.py", "attr/_make.py", "rich/text.py", "requests/sessions.py")
CODE_CHARS = 7_800  # from each module
BOOK_TUNING = ("ch13-01-closures", "ch15-01-box", "ch16-02-message-passing")
NODE_TUNING = ("path", "timers")
CODE_TUNING = ("networkx/algorithms/shortest_paths/weighted.py", "pygments/lexer.py", "yaml/constructor.py",
               "tomlkit/items.py")
TUNING_DOCS_CHARS = 5_000  # from each tuning page or chapter
TUNING_CODE_CHARS = 6_500  # from each tuning module


def cut(text: str, chars: int, at: str = "\n") -> str:
    """The first `chars` characters, ended at the last `at` before them."""
    if len(text) <= chars:
        return text
    return text[: text.rindex(at, 0, chars) + len(at)]


class _BookText(html.parser.HTMLParser):
    """The text of an mdBook page's <main>: paragraphs and headings as lines, code blocks verbatim."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "pre", "blockquote", "tr", "table", "ul", "ol", "div"}
    SKIP = {"script", "style", "button", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.main, self.pre, self.skip = [], 0, 0, 0

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.main += 1
        if tag in self.SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if self.main and tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag == "main":
            self.main -= 1
        if tag in self.SKIP:
            self.skip -= 1
        if tag == "pre":
            self.pre -= 1
        if self.main and tag in self.BLOCKS:
            self.out.append("\n")

    def handle_data(self, data):
        if self.main and not self.skip:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def book_chapter(name: str) -> str:
    parser = _BookText()
    parser.feed(Path(BOOK, name + ".html").read_text(encoding="utf-8"))
    return parser.text()


def node_page(name: str) -> str:
    text = Path(NODE, name + ".md").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("<!--") and not line.startswith("[")]
    return "\n".join(lines).strip() + "\n"


def module_source(rel: str) -> str:
    return (Path(sysconfig.get_paths()["purelib"]) / rel).read_text(encoding="utf-8")


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Pieces of about `size` characters, each ended on a line boundary."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        out.append(text[i:j])
        i = j
    return out


def interleave(domains: dict[str, list[str]]) -> str:
    """Every domain's chunks spread evenly over the text: chunk i of n sits at (i + 0.5) / n."""
    placed = [((i + 0.5) / len(cs), d, c) for d, (name, cs) in enumerate(domains.items()) for i, c in enumerate(cs)]
    return "".join(c if c.endswith("\n") else c + "\n" for _, _, c in sorted(placed, key=lambda t: (t[0], t[1])))


def calibration_text() -> str:
    wiki = cut(WIKITEXT.read_text(encoding="utf-8"), WIKI_CHARS)
    book = "\n".join(cut(book_chapter(c), BOOK_CHARS) for c in BOOK_CALIB)
    api = "\n".join(cut(node_page(p), NODE_CHARS) for p in NODE_CALIB)
    code = "\n".join(cut(module_source(m), CODE_CHARS) for m in CODE_CALIB)
    return interleave({"prose": chunks(wiki), "book": chunks(book), "api": chunks(api), "code": chunks(code)})


def tuning_docs_text() -> str:
    parts = [cut(book_chapter(c), TUNING_DOCS_CHARS) for c in BOOK_TUNING]
    parts += [cut(node_page(p), TUNING_DOCS_CHARS) for p in NODE_TUNING]
    return "\n".join(parts)


def tuning_code_text() -> str:
    return "\n".join(cut(module_source(m), TUNING_CODE_CHARS) for m in CODE_TUNING)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "leptonc" / "data"))
    args = ap.parse_args(argv)
    missing = [p for p in (WIKITEXT, Path(BOOK), Path(NODE)) if not p.exists()]
    if missing:
        raise SystemExit(f"missing sources: {', '.join(map(str, missing))}")
    out = Path(args.out_dir)
    for name, text in (("calibration.txt", calibration_text()), ("tuning_docs.txt", tuning_docs_text()),
                       ("tuning_code.txt", tuning_code_text())):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
