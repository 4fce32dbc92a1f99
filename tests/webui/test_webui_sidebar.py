"""The sidebar from the keyboard: on a phone-sized screen the closed sidebar is out of the
Tab order, Esc cancels a delete, and focus goes somewhere sensible after a rename or a
delete (never lost to the page's body)."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, expect
from webui_helpers import PHONE, PageWatch, api, open_app

from bitserve.api.process import ServerProcess

# Where the keyboard focus is: the element's id or class, and whether it is in the sidebar.
FOCUSED = """() => {
  const e = document.activeElement;
  return { name: e.id || e.className || e.tagName, inSidebar: Boolean(e.closest("#sidebar")) };
}"""


def test_on_a_phone_the_closed_sidebar_takes_no_focus(
    browser: Browser, server: ServerProcess
) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    watch = PageWatch(context.new_page())
    page = watch.page
    try:
        created = api(server.url, "POST", "/v1/conversations", json={"metadata": {"title": "Tab"}})
        open_app(page, server.url)
        item = page.locator(f'.conversation[data-id="{created["id"]}"]')
        expect(item).to_have_count(1)
        visited = []
        for _ in range(12):  # round the whole page: header, composer and back
            page.keyboard.press("Tab")
            visited.append(page.evaluate(FOCUSED))
        assert not [v for v in visited if v["inSidebar"]], visited
        assert {"name": "input", "inSidebar": False} in visited  # Tab does go round

        page.click("#toggle-sidebar")  # open: focus goes into it, its buttons take focus again
        expect(page.locator("#new-chat")).to_be_focused()
        page.keyboard.press("Tab")
        expect(page.locator("#refresh")).to_be_focused()
        item.locator(".title").click()  # closes it
        expect(page.locator("#sidebar")).not_to_be_in_viewport()
        page.locator("#input").focus()
        page.keyboard.press("Shift+Tab")
        assert not page.evaluate(FOCUSED)["inSidebar"]
    finally:
        context.close()
    assert watch.errors == []


def test_the_sidebar_from_the_keyboard(page: Page, server: ServerProcess) -> None:
    url = server.url
    kept = api(url, "POST", "/v1/conversations", json={"metadata": {"title": "Kept"}})["id"]
    named = api(url, "POST", "/v1/conversations", json={"metadata": {"title": "Named"}})["id"]
    open_app(page, url)
    items = page.locator(".conversation")
    expect(items.first).to_have_attribute("data-id", named)  # newest first, then "Kept"
    item = page.locator(f'.conversation[data-id="{named}"]')

    # Esc cancels a delete; focus goes back to ✕
    item.locator(".delete").focus()
    page.keyboard.press("Enter")
    expect(item).to_contain_text("Delete “Named”?")
    expect(item.locator(".cancel-delete")).to_be_focused()
    page.keyboard.press("Escape")
    expect(item.locator(".title")).to_have_text("Named")
    expect(item.locator(".delete")).to_be_focused()

    # a rename from the keyboard (Enter saves, Esc keeps the title): focus back on ✎
    page.keyboard.press("Shift+Tab")
    expect(item.locator(".rename")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".rename-input")).to_be_focused()
    page.keyboard.press("Control+A")
    page.keyboard.type("Renamed")
    page.keyboard.press("Enter")
    expect(item.locator(".title")).to_have_text("Renamed")
    expect(item.locator(".rename")).to_be_focused()
    assert api(url, "GET", f"/v1/conversations/{named}")["metadata"] == {"title": "Renamed"}
    page.keyboard.press("Enter")
    page.keyboard.type("Not this")
    page.keyboard.press("Escape")
    expect(item.locator(".title")).to_have_text("Renamed")
    expect(item.locator(".rename")).to_be_focused()

    # a delete: focus goes to the conversation that took its place
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.keyboard.press("Shift+Tab")
    expect(item.locator(".confirm-delete")).to_be_focused()
    page.keyboard.press("Enter")
    expect(item).to_have_count(0)
    expect(page.locator(f'.conversation[data-id="{kept}"] .title')).to_be_focused()
