"""The shipped workflows in ComfyUI's real frontend (headless Chromium through Playwright, the system's chromium):
each opens from the Templates menu (EXTENSIONS -> the pack's folder) with no error, the graph the frontend builds
is the shipped one, and the frontend's own UI -> API conversion (graphToPrompt) gives what our test converter gives.
A screenshot of each opened workflow is kept in the test artifacts."""

import json
import os
import shutil

import comfy_workflows as cw
import pytest
from comfy_server import PACK_NAME, artifacts_dir, comfyui_path, running_server

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(
        comfyui_path() is None, reason="needs COMFYUI_PATH (a ComfyUI tree; run pytest with ComfyUI's Python)"
    ),
]

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 60_000
# Console noise of an offline frontend with an empty user folder (user.css, templates index, remote assets).
HARMLESS = ("Failed to load resource", "ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "frontend", checkpoints=()) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A fresh frontend page that records page errors, console errors, alerts and error toasts."""

    def __init__(self, browser, url):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors, self.alerts = [], []
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on(
            "console",
            lambda m: (
                m.type == "error"
                and not any(h in m.text for h in HARMLESS)
                and self.errors.append(f"console: {m.text}")
            ),
        )
        self.page.on("dialog", lambda d: (self.alerts.append(d.message), d.dismiss()))
        self.page.goto(url)
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph")
        self.page.wait_for_timeout(2000)

    def error_toasts(self):
        return self.page.locator(".p-toast-message-error").all_inner_texts()

    def close(self):
        self.context.close()


@pytest.mark.parametrize("name", cw.WORKFLOW_NAMES)
def test_workflow_opens_from_the_templates_menu(name, server, browser, tmp_path_factory):
    view = Page(browser, server.url + "/")
    page = view.page
    try:
        # a first visit may open the Templates dialog by itself; start from the canvas like a returning user
        if page.get_by_role("dialog").count():
            page.get_by_role("dialog").locator("button:has(i.pi-times)").first.click()
            page.get_by_role("dialog").wait_for(state="hidden")
        page.get_by_role("button", name="Templates").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("EXTENSIONS", exact=False).wait_for()
        dialog.get_by_text(PACK_NAME, exact=True).first.click()
        card = dialog.get_by_test_id(f"template-workflow-{name}")
        card.wait_for()
        assert sorted(
            t.split("template-workflow-")[1]
            for t in page.evaluate(
                "() => Array.from(document.querySelectorAll('[data-testid^=template-workflow-]'))"
                ".map(e => e.getAttribute('data-testid'))"
            )
        ) == sorted(cw.WORKFLOW_NAMES)
        card.click()
        page.wait_for_function(f"window.app.graph._nodes.length === {len(cw.load(name)['nodes'])}")
        page.get_by_role("dialog").wait_for(state="hidden")
        page.wait_for_timeout(1500)

        assert view.alerts == [] and view.errors == [] and view.error_toasts() == []
        assert page.get_by_role("dialog").count() == 0  # no missing-nodes or other error dialog
        shipped = cw.load(name)
        loaded = json.loads(page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)"))
        assert sorted((n["id"], n["type"], n.get("mode", 0)) for n in loaded["nodes"]) == sorted(
            (n["id"], n["type"], n["mode"]) for n in shipped["nodes"]
        )
        assert sorted(map(tuple, loaded["links"])) == sorted(map(tuple, shipped["links"]))
        assert {n["id"]: n.get("widgets_values") or [] for n in loaded["nodes"]} == {
            n["id"]: n.get("widgets_values") or [] for n in shipped["nodes"]
        }
        for node_type in {n["type"] for n in shipped["nodes"]}:
            assert page.evaluate("(t) => !!LiteGraph.registered_node_types[t]", node_type), node_type

        # the frontend's own conversion (what the Run button queues) equals the test converter's
        api = json.loads(page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)"))
        api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        object_info = server.object_info()
        types = {n["type"] for n in shipped["nodes"]} - cw.FRONTEND_ONLY
        assert api == cw.to_api(shipped, cw.declarations_from_object_info(object_info, types))

        # screenshot with the node text readable at the fitted zoom (also the source of the thumbnails)
        page.evaluate("""async () => { const s = window.app.extensionManager.setting;
            await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 1); await s.set('Comfy.Minimap.Visible', false);
            await s.set('Comfy.Graph.CanvasInfo', false); window.app.canvas.setDirty(true, true); }""")
        page.wait_for_timeout(1000)
        shot = artifacts_dir(tmp_path_factory) / f"{name}-opened.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
    finally:
        view.close()
