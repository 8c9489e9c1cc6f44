"""Loads a replica's operator page in headless Chromium, as an operator would: with the
operator's client certificate, then fills in the lookup form and submits it, then once more
with no certificate and with a client's certificate (both must be refused). Prints what the
browser rendered as one JSON object, and saves a screenshot.

Usage: operator_page.py URL CHROMIUM OPERATOR_CERT OPERATOR_KEY CLIENT_CERT CLIENT_KEY
       SCREENSHOT LOOKUP_TXID
"""

import json
import sys
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright


def main() -> None:
    url, chromium, op_cert, op_key, client_cert, client_key, screenshot, txid = sys.argv[1:9]
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)

        def context(cert=None, key=None):
            certs = [{"origin": origin, "certPath": cert, "keyPath": key}] if cert else []
            # The deployment's own CA signs the page's certificate: the test trusts it by
            # ignoring errors, as an operator would import the CA.
            return browser.new_context(
                ignore_https_errors=True,
                client_certificates=certs,
                viewport={"width": 1280, "height": 1000},
            )

        operator = context(op_cert, op_key)
        page = operator.new_page()
        response = page.goto(url)
        out["status"] = response.status if response else None
        out["title"] = page.title()
        out["text"] = page.inner_text("body")
        out["headings"] = page.locator("h2").all_inner_texts()
        out["in_doubt_links"] = page.locator("a.txid").all_inner_texts()
        out["tables"] = page.locator("table").count()
        out["scripts"] = page.locator("script").count()
        page.screenshot(path=screenshot, full_page=True)

        page.fill("input[name=txid]", txid)
        page.click("button[type=submit]")
        page.wait_for_load_state("load")
        out["lookup_url"] = page.url
        out["lookup_text"] = page.inner_text("body")

        # Hostile requests, with the operator's own certificate: the page is read-only and
        # bounded, and what it echoes is escaped.
        hostile = {}
        for name, method, path in (
            ("post", "POST", "/"),
            ("long_query", "GET", "/?txid=" + "a" * 300),
            ("other_path", "GET", "/admin"),
            ("markup", "GET", "/?txid=%3Cscript%3Ealert(1)%3C/script%3E"),
        ):
            r = operator.request.fetch(origin + path, method=method)
            hostile[name] = {"status": r.status, "body": r.text()}
        out["hostile"] = hostile
        operator.close()

        for name, ctx in (("anonymous", context()), ("client", context(client_cert, client_key))):
            refused = ctx.new_page()
            response = refused.goto(url)
            out[name] = {
                "status": response.status if response else None,
                "text": refused.inner_text("body"),
            }
            ctx.close()
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
