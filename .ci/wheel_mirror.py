"""A package index for `docker build` that serves this machine's local wheel indexes first.

The Dockerfiles install torch with `pip install --index-url TORCH_INDEX`; where that index
cannot be reached, CI passes this server instead. Each project's page lists the wheels of the
local PEP 503 indexes (folders holding simple/<project>/index.html and the files it links),
then PyPI's files of the same project that are not on disk, so what the local indexes lack
(a dependency, another version) still resolves. Serves until killed.

    python .ci/wheel_mirror.py PORT INDEX_DIR...
"""

from __future__ import annotations

import html
import re
import sys
import urllib.error
import urllib.request
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PYPI = "https://pypi.org/simple/"
ANCHOR = re.compile(r"<a\s[^>]*>[^<]*</a>", re.IGNORECASE)
HREF = re.compile(r'href="([^"#]+)(#[^"]*)?"', re.IGNORECASE)


def local_anchors(roots: list[Path], project: str) -> dict[str, str]:
    """File name -> anchor pointing at /files/<root>/<name>, from each root's page of project."""
    anchors: dict[str, str] = {}
    for number, root in enumerate(roots):
        page = root / "simple" / project / "index.html"
        if not page.is_file():
            continue
        for anchor in ANCHOR.findall(page.read_text()):
            match = HREF.search(anchor)
            if match is None:
                continue
            name = Path(html.unescape(match.group(1))).name
            if (root / "files" / name).is_file():
                href = f'href="/files/{number}/{name}{match.group(2) or ""}"'
                anchors.setdefault(name, HREF.sub(href, anchor, count=1))
    return anchors


def pypi_anchors(project: str) -> dict[str, str]:
    """File name -> anchor of PyPI's page of project (its links are absolute); {} if unknown."""
    request = urllib.request.Request(PYPI + project + "/", headers={"Accept": "text/html"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return {}
        raise
    anchors = {}
    for anchor in ANCHOR.findall(text):
        match = HREF.search(anchor)
        if match is not None:
            anchors[Path(html.unescape(match.group(1))).name] = anchor
    return anchors


class Handler(BaseHTTPRequestHandler):
    """GET /simple/<project>/ (the merged page) and /files/<root>/<name> (a local file)."""

    def __init__(self, *args: object, roots: list[Path], **kwargs: object) -> None:
        self.roots = roots
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        if len(parts) == 2 and parts[0] == "simple":
            self.send_page(re.sub(r"[-_.]+", "-", parts[1]).lower())
        elif len(parts) == 3 and parts[0] == "files" and parts[1].isdigit():
            self.send_file(int(parts[1]), parts[2])
        else:
            self.send_error(404)

    def send_page(self, project: str) -> None:
        """The local files of project first, then PyPI's others."""
        local = local_anchors(self.roots, project)
        others = {n: a for n, a in pypi_anchors(project).items() if n not in local}
        if not local and not others:
            self.send_error(404)
            return
        body = "<!DOCTYPE html><html><body>\n" + "<br>\n".join([*local.values(), *others.values()])
        self.send_body(body.encode(), "text/html")

    def send_file(self, root: int, name: str) -> None:
        if root >= len(self.roots) or "/" in name or name.startswith("."):
            self.send_error(404)
            return
        path = self.roots[root] / "files" / name
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                self.wfile.write(chunk)

    def send_body(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        sys.stderr.write(f"wheel mirror: {format % args}\n")


def main(argv: list[str]) -> int:
    """Serve on 0.0.0.0:PORT (the build containers reach it on the bridge's gateway)."""
    if len(argv) < 2:
        sys.stderr.write(__doc__ or "")
        return 2
    roots = [Path(a) for a in argv[1:]]
    server = ThreadingHTTPServer(("0.0.0.0", int(argv[0])), partial(Handler, roots=roots))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
