"""The documentation site and the stored outputs: `make docs` builds offline from the notebooks (every notebook a page,
no broken internal link, the API reference from the docstrings), and its pages show text and images in Chromium;
every tutorial is committed with the outputs of a run."""

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
sys.path.insert(0, str(ROOT / "docs"))
import build_site  # noqa: E402  (docs/build_site.py)

NOTEBOOKS = sorted(p.relative_to(ROOT / "nbs") for p in (ROOT / "nbs").rglob("*.ipynb") if "runs" not in p.parts)
TUTORIALS = [p for p in NOTEBOOKS if p.parts[0] == "tutorials"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("href", "src"):
            if tag in ("a", "img", "link", "script") and a.get(k):
                self.links.append(a[k])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    staged = build_site.build(out, tmp_path_factory.mktemp("stage"))
    return out, staged


def test_every_notebook_has_a_page_and_every_module_an_api_page(site):
    out, staged = site
    assert sorted(staged) == NOTEBOOKS
    for nb in NOTEBOOKS:
        page = out / nb.with_suffix(".html")
        assert page.exists(), page
    from scaletrain._modidx import d

    for m in sorted(d["syms"]):
        html = (out / "api" / f"{m}.html").read_text()
        assert f'id="{m}' in html or f"id=\"module-{m}\"" in html, m
    # the docstrings' sections are rendered (napoleon), e.g. the Trainer's arguments
    train = (out / "api" / "scaletrain.train.html").read_text()
    assert "Trainer" in train and "Parameters" in train and "default_callbacks" in train
    # nbdev's machinery is not shown
    for nb in NOTEBOOKS:
        text = (out / nb.with_suffix(".html")).read_text()
        assert "#| export" not in text and "default_exp" not in text, nb


def test_no_broken_internal_links(site):
    out, _ = site
    broken = []
    for page in out.rglob("*.html"):
        p = Links()
        p.feed(page.read_text())
        for link in p.links:
            u = urlparse(link)
            if u.scheme or u.netloc or link.startswith(("#", "mailto:", "data:")):
                continue
            target = (page.parent / urldefrag(u.path)[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(out)} -> {link}")
    assert not broken, broken[:20]


def test_every_tutorial_is_committed_with_outputs():
    "A tutorial stored without the outputs of a run fails here (`make tutorials` stores them)."
    for rel in TUTORIALS:
        nb = json.loads((ROOT / "nbs" / rel).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        with_out = [c for c in code if c.get("outputs")]
        assert len(with_out) >= len(code) // 2, f"{rel}: {len(with_out)} of {len(code)} code cells have outputs"
        text = json.dumps(nb)
        assert not re.search(r"/tmp/[A-Za-z-]*[a-z0-9_]{8}/", text.replace("XXXXXXXX", "")), f"{rel}: a temp path"
    first = json.loads((ROOT / "nbs" / "tutorials" / "01_pretraining.ipynb").read_text())
    outs = [o for c in first["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outs), "tutorial 01 has no plot stored"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_pages_show_text_and_images_in_chromium(site, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = site
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto((out / "index.html").as_uri())
            page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
            body = page.inner_text("body")
            assert "scaletrain" in body and "Tutorials" in body and "API reference" in body
            page.goto((out / "tutorials" / "01_pretraining.html").as_uri())
            page.screenshot(path=str(tmp_path / "tutorial01.png"), full_page=True)
            assert "val loss" in page.inner_text("body")
            sizes = page.eval_on_selector_all("article img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert sizes and all(done and w > 0 for done, w in sizes), sizes  # the stored plots load and decode
        finally:
            browser.close()
    assert (tmp_path / "index.png").stat().st_size > 0


def test_readme_images_exist_and_come_from_the_project():
    "Every image of the README is in the repository; the tutorial plot is the PNG stored in the notebook's output."
    import readme_images  # docs/readme_images.py

    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert "nbs/images/launch_panel.png" in images and set(readme_images.IMAGES) <= set(images)
    for rel in images:
        assert (ROOT / rel).is_file() and (ROOT / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    for rel, (nb, marker) in readme_images.IMAGES.items():
        assert (ROOT / rel).read_bytes() == readme_images.stored_png(ROOT / nb, marker), f"{rel}: not {nb}'s output"
    assert "[`make docs`](Makefile)" in readme
    assert "docs/readme_images.py" in (ROOT / "Makefile").read_text().split("tutorials: setup-dev", 1)[1]
