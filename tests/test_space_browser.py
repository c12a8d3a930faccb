"""The Space in headless Chromium: type a prompt, analyse it, find the heat map, decode it, click
a cell of the decode timeline, and decode again with the other sampler; open a feature page by its
link and search a token.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package. Set
SPACE_SCREENSHOT=1 to also save the pages to space/screenshot.png, space/timeline.png and
docs/feature-page.png; SPACE_SUITE=FOLDER serves that suite instead of the tiny trained one (the
README's screenshots are of the default suite).
"""

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CHROMIUM = "/usr/bin/chromium"
sys.path.insert(0, str(ROOT / "space"))

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)",
)

X_AXIS = "g[aria-label^='X-axis'] .role-axis-label text"
PROMPT = (
    "The [MASK] statement is used to leave a loop early, and continue skips to the next [MASK]."
)


@pytest.fixture(scope="module")
def explorer(request):
    from explorer import Explorer

    suite = os.environ.get("SPACE_SUITE") or str(request.getfixturevalue("trained_suite"))
    return Explorer.load(suite, device="cpu")


@pytest.fixture(scope="module")
def url(explorer):
    import app

    from tests.test_space import free_port

    demo = app.build_app(explorer)
    demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, css=app.CSS
    )
    yield demo.local_url
    demo.close()


def test_page_analyses_a_typed_prompt(url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(headless=True, executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url)
        expect(page.locator("#link")).to_contain_text("feature=", timeout=60_000)  # page loaded
        page.get_by_label("Prompt", exact=False).fill(PROMPT)
        page.get_by_role("button", name="Analyse").click()
        expect(page.locator("#heatmap")).to_contain_text("continue", timeout=30_000)
        heat = page.locator("#heatmap .score-token")
        tokens = heat.all_inner_texts()
        masks = [i for i, t in enumerate(tokens) if "[MASK]" in t]
        assert tokens[0].strip() == "[CLS]" and len(masks) == 2
        assert page.locator("#heatmap .score-token.highlighted").count() == 2
        expect(page.get_by_text("2 analysed")).to_be_visible()
        if os.environ.get("SPACE_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "space" / "screenshot.png"), full_page=True)

        table = page.get_by_role("grid", name="Top features of the token (click one)")
        feature = table.get_by_role("gridcell").nth(3)  # the second row's feature
        expected = feature.inner_text().strip()
        feature.click()
        expect(page.locator("h3", has_text=f"Feature {expected} ")).to_be_visible()
        token = page.get_by_role("combobox", name="Token")
        other = next(i for i in masks if not token.input_value().startswith(f"{i}:"))
        heat.nth(other).click()
        expect(token).to_have_value(f"{other}: [MASK]")
        page.get_by_role("tab", name="Decode").click()
        page.get_by_role("button", name="Decode", exact=True).click()
        timeline = page.get_by_role("grid", name="Unsteered timeline")
        waiting = timeline.get_by_role("gridcell", name="…", exact=True)
        expect(waiting.first).to_be_visible(timeout=60_000)
        expect(page.locator("#plain")).to_contain_text("generated")
        expect(page.get_by_text("masked-token log-likelihood per token")).to_be_visible()
        waiting.first.click()
        expect(page.get_by_text("masked then")).to_be_visible()
        cell = page.get_by_role("grid", name="Features of the cell").get_by_role("gridcell")
        expect(cell.first).to_be_visible()
        if os.environ.get("SPACE_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "space" / "timeline.png"), full_page=True)
        expect(page.get_by_text("Decoded with LLaDA's generate")).to_be_visible()
        expect(page.get_by_label("alg", exact=True)).to_be_hidden()
        page.get_by_label("Dream's diffusion_generate").check()  # the other sampler's options
        expect(page.get_by_label("alg", exact=True)).to_be_visible()
        page.get_by_role("button", name="Decode", exact=True).click()
        expect(page.get_by_text("Decoded with Dream's diffusion_generate")).to_be_visible(
            timeout=60_000
        )
        browser.close()


def bin_labels(frame) -> list[str]:
    """A histogram's x-axis labels as the browser shows them."""
    return [label.strip() for label in frame["activation from"]]


def test_a_link_opens_a_feature_page(url, explorer):
    """Histogram, quantile examples on clean text with the masked positions marked, frequency by
    t; then a token search whose result, clicked, becomes the page and the address bar's link."""
    import views
    from playwright.sync_api import expect, sync_playwright

    layer = explorer.default_layer
    stats = explorer.features[layer]
    # a feature with examples in every band (a rare one's few activations are all top examples)
    feature = int((stats.example_values[:, 1:, 0] > 0).all(1).nonzero()[0])
    with sync_playwright() as p:
        browser = p.chromium.launch(headless=True, executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(f"{url}?layer={layer}&k={explorer.k}&feature={feature}")
        expect(page.locator("h3", has_text=f"Feature {feature} · layer {layer}")).to_be_visible(
            timeout=60_000
        )
        bins = page.locator(f"#histogram {X_AXIS}")  # drawn by vega in the browser
        expect(bins).to_have_text(bin_labels(views.histogram_frame(explorer, layer, feature)))
        expect(page.locator(f"#frequency-by-t {X_AXIS}")).to_have_text(views.T_LABELS)
        examples = page.locator("#examples")
        expect(examples.get_by_text("Quantiles 0.00-0.25 of its activations")).to_be_visible()
        assert examples.locator("mark.centre").count() == int(
            (stats.example_values[feature] > 0).sum()
        )
        assert examples.locator(".masked").count() > examples.locator("mark.centre").count()
        assert "[MASK]" not in examples.inner_text()  # clean text
        expect(
            page.get_by_text(f"?layer={layer}&k={explorer.k}&feature={feature}").first
        ).to_be_visible()
        if os.environ.get("SPACE_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "docs" / "feature-page.png"), full_page=True)

        centres = stats.example_ids[..., stats.window].flatten()
        token = int(centres[centres >= 0].mode().values)  # on the examples of many features
        page.get_by_text("Search features").click()
        page.get_by_label("Token or text").fill(explorer.token_text(token))
        page.get_by_role("button", name="Search", exact=True).click()
        found = page.get_by_role("grid", name="Features found (click one)")
        cell = found.get_by_role("gridcell").nth(4)  # the second row's feature
        expect(cell).to_be_visible(timeout=30_000)
        other = cell.inner_text().strip()
        cell.click()
        expect(page.locator("h3", has_text=f"Feature {other} · layer {layer}")).to_be_visible()
        counts = views.histogram_frame(explorer, layer, int(other))["positions"]
        bars = page.locator("#histogram .mark-rect path")
        expect(bars.first).to_have_attribute("aria-label", re.compile(f"positions: {counts[0]}$"))
        expect(bars.last).to_have_attribute(
            "aria-label", re.compile(f"positions: {counts.iloc[-1]}$")
        )
        expect(page).to_have_url(f"{url}?layer={layer}&k={explorer.k}&feature={other}")
        browser.close()
