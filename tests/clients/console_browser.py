"""The fleet console in headless Chromium (Debian's chromium and chromium-driver), driven by
selenium, against a running ferry-cloud with two edges.

Usage:
  python3 console_browser.py fleet BASE_URL SHOTS_DIR
      The scenario of tests/tests/console.rs, in steps synchronised with the test over
      stdin/stdout: this script prints "STEP <name>" and waits for a line "go" before it
      goes on (the test cuts gw-1's link, then gives it back).
  python3 console_browser.py edge STATUS_URL SHOTS_DIR
      ferry-edge's status page (its metrics listener's /): the link up, the outbox shown.
  python3 console_browser.py thousand PAGE_FILE
      The page (saved from the cloud) served by this script with 1,000 made-up edges:
      prints how long it takes from navigation to the table drawn.
Prints one line per check and "OK" at the end.
"""
import http.server
import json
import os
import sys
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def browser(width=1280, height=900):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def check(what, ok):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


def step(name):
    print("STEP " + name, flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("the test stopped")


def cell(d, edge, field):
    els = d.find_elements(By.CSS_SELECTOR, f'tr[data-edge="{edge}"] td[data-field="{field}"]')
    return els[0].text if els else ""


def wait(d, what, cond, secs=90):
    try:
        WebDriverWait(d, secs, poll_frequency=0.5).until(lambda _: cond())
    except Exception:
        d.save_screenshot("/tmp/console-failed.png")
        check(what + " (screenshot /tmp/console-failed.png)", False)
    check(what, True)


def login(d, user, password):
    form = d.find_element(By.ID, "login-form")
    form.find_element(By.NAME, "username").send_keys(user)
    form.find_element(By.NAME, "password").send_keys(password)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def errors(d):
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


def number(text):
    digits = "".join(ch for ch in text if ch.isdigit())
    return int(digits) if digits else -1


def fleet(base, shots):
    d = browser()
    d.get(base + "/")
    wait(d, "the login form is shown", lambda: d.find_element(By.ID, "login").is_displayed())
    login(d, "noc", "noc-pw")
    wait(d, "both edges are linked", lambda: cell(d, "gw-1", "state").startswith("linked")
         and cell(d, "gw-2", "state").startswith("linked"))
    wait(d, "gw-1 tells its figures", lambda: cell(d, "gw-1", "sent") not in ("", "–"))
    d.save_screenshot(os.path.join(shots, "console-fleet.png"))

    step("cut")
    wait(d, "gw-1 is offline", lambda: cell(d, "gw-1", "state").startswith("offline"))
    wait(d, "its backlog is estimated and growing",
         lambda: cell(d, "gw-1", "backlog").startswith("≈") and "↑" in cell(d, "gw-1", "backlog"))
    first = number(cell(d, "gw-1", "backlog"))
    wait(d, "the estimate grows", lambda: number(cell(d, "gw-1", "backlog")) > first)
    d.find_element(By.CSS_SELECTOR, '[data-filter="offline"]').click()
    visible = [r.get_attribute("data-edge") for r in d.find_elements(By.CSS_SELECTOR, "tr.edge")
               if r.is_displayed()]
    check("the offline filter shows gw-1 alone: %s" % visible, visible == ["gw-1"])
    check("the counts say one offline",
          "Offline 1" in d.find_element(By.ID, "filters").text)
    d.save_screenshot(os.path.join(shots, "console-offline.png"))
    d.find_element(By.CSS_SELECTOR, '[data-filter="all"]').click()

    step("restore")
    wait(d, "gw-1 is linked again", lambda: cell(d, "gw-1", "state").startswith("linked"))
    wait(d, "its backlog falls to zero", lambda: cell(d, "gw-1", "backlog") == "0")
    d.find_element(By.CSS_SELECTOR, 'tr[data-edge="gw-1"]').click()
    wait(d, "the edge's page shows its link history",
         lambda: "unlinked" in d.find_element(By.ID, "edge-events").text)
    wait(d, "its chart has the backlog it came back with",
         lambda: len(d.find_elements(By.CSS_SELECTOR, "#edge-chart path")) >= 1)
    check("its certificate's expiry is shown",
          "Expires" in d.find_element(By.ID, "edge-facts").text)
    check("a viewer has no actions", not d.find_element(By.ID, "edge-actions").is_displayed())
    d.find_element(By.ID, "peek").click()
    wait(d, "a peek shows the last messages it sent, with their topic",
         lambda: "gw-1/sensors/t" in d.find_element(By.ID, "edge-peek").text)
    d.save_screenshot(os.path.join(shots, "console-edge.png"))

    # The viewer's session may not act, whatever the page shows.
    refused = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch("/api/fleet/gw-2/deny", {method: "POST", headers: {"X-Ferry-CSRF": state.session.csrf}})
          .then(r => done(r.status));""")
    check("a viewer's deny is refused (%s)" % refused, refused == 403)
    expected = errors(d)
    check("the browser logged that refusal and nothing else: %s" % expected,
          len(expected) == 1 and "/api/fleet/gw-2/deny" in expected[0]["message"])

    # The admin denies gw-2 and allows it again, each confirmed.
    d.find_element(By.ID, "logout").click()
    wait(d, "logged out", lambda: d.find_element(By.ID, "login").is_displayed())
    login(d, "ops", "ops-pw")
    wait(d, "the admin is logged in", lambda: "ops (admin)" in d.find_element(By.ID, "who").text)
    wait(d, "gw-2 is listed", lambda: cell(d, "gw-2", "state").startswith("linked"))
    d.find_element(By.CSS_SELECTOR, 'tr[data-edge="gw-2"]').click()
    wait(d, "the admin has actions", lambda: d.find_element(By.ID, "edge-actions").is_displayed())
    d.find_element(By.ID, "deny").click()
    d.switch_to.alert.accept()
    wait(d, "gw-2 is denied", lambda: "denied" in d.find_element(By.ID, "edge-facts").text)
    d.find_element(By.ID, "allow").click()
    d.switch_to.alert.accept()
    wait(d, "gw-2 is linked again", lambda: "linked" in d.find_element(By.ID, "edge-facts").text)
    d.find_element(By.ID, "back").click()

    # The data tab: the streams and the readers.
    d.find_element(By.CSS_SELECTOR, 'nav [data-tab="data"]').click()
    wait(d, "the data tab lists the mqtt stream",
         lambda: "mqtt" in d.find_element(By.ID, "streams").text)
    wait(d, "with its retention (7 days by default) and its rate",
         lambda: "7 d" in d.find_element(By.ID, "streams").text
         and "/s" in d.find_element(By.ID, "streams").text)
    d.save_screenshot(os.path.join(shots, "console-data.png"))

    # A phone-sized window: no sideways scrolling, the table still there.
    d.find_element(By.CSS_SELECTOR, 'nav [data-tab="fleet"]').click()
    d.set_window_size(390, 844)
    wait(d, "the fleet is shown on a phone", lambda: cell(d, "gw-1", "state") != "")
    overflow = d.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    check("no sideways scrolling on a phone (%s px)" % overflow, overflow <= 0)
    d.save_screenshot(os.path.join(shots, "console-phone.png"))
    bad = errors(d)
    check("no console errors: %s" % bad, not bad)
    d.quit()


def edge(url, shots):
    d = browser()
    d.get(url)
    wait(d, "the edge's status page shows its link up",
         lambda: "up" in d.find_element(By.ID, "link").text)
    check("and its outbox", "outbox records" in d.find_element(By.ID, "broker").text)
    d.save_screenshot(os.path.join(shots, "edge-status.png"))
    bad = errors(d)
    check("no console errors: %s" % bad, not bad)
    d.quit()


def thousand(page_file):
    page = open(page_file, "rb").read()
    now = int(time.time() * 1000)
    edges = []
    for i in range(1000):
        offline = i % 10 == 0
        edges.append({
            "edge": "gw-%04d" % i, "state": "offline" if offline else "linked",
            "state_since_unix_ms": now - 600_000, "last_contact_unix_ms": now - 2_000,
            "denied": False, "serial": "%032x" % i, "cert_expires_unix_secs": now // 1000 + 86400 * 300,
            "link": None, "estimate": {"records": 5000 + i, "basis": "test"} if offline else None,
            "outbox": {"at_unix_ms": now, "records": i * 10, "bytes": i * 1000,
                       "budget_bytes": 268435456, "oldest_age_ms": i * 100, "last_seq": i * 1000,
                       "rejected": 0, "dropped": 0, "clients": 3},
            "rates": {"inflow": 100.0, "sent": 100.0, "drain": 0.0},
            "acked_records": i * 1000, "acked_bytes": i * 100000,
            "growing": offline, "near_budget": False,
            "points": [[now - 3600_000 + k * 120_000, (i * k) % 500, k * 1000] for k in range(30)],
        })
    fleet_doc = json.dumps({"now_unix_ms": now, "counts": {
        "edges": 1000, "linked": 900, "offline": 100, "denied": 0, "growing": 100,
        "near_budget": 0}, "edges": edges}).encode()
    session = json.dumps({"auth": False, "user": None, "role": "viewer", "csrf": None}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, kind = {"/": (page, "text/html"), "/api/session": (session, "application/json"),
                          "/api/fleet": (fleet_doc, "application/json")}.get(
                              self.path, (b"{}", "application/json"))
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = browser()
    url = "http://127.0.0.1:%d/" % server.server_address[1]
    d.get(url)
    WebDriverWait(d, 60).until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "tr.edge")) == 1000)
    # From the start of navigation to the table drawn (the page marks its first render).
    ms = d.execute_script("""return performance.getEntriesByName("fleet-drawn")[0].startTime""")
    drawn = d.execute_script("""
        const rows = document.querySelectorAll('tr.edge');
        return rows.length;""")
    check("1,000 edges drawn (%d rows)" % drawn, drawn == 1000)
    # One refresh of the whole table, timed inside the page.
    render = d.execute_script("""
        const t = performance.now(); renderFleet(); return performance.now() - t;""")
    print("render: first table %.0f ms after navigation began; a refresh of 1,000 rows %.0f ms"
          % (ms, render), flush=True)
    bad = errors(d)
    check("no console errors: %s" % bad, not bad)
    d.quit()
    server.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "fleet":
        fleet(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "edge":
        edge(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "thousand":
        thousand(sys.argv[2])
    else:
        sys.exit(__doc__)
    print("OK", flush=True)
