"""Real headless Chromium: a sibling host cannot shadow the session cookie, and a session
revoked elsewhere is signed out (not answered 500).

The app runs behind the helper on ``https://app.example.test``; the "attacker" is the
sibling host ``https://evil.example.test``, a same-site origin that may set cookies for the
parent domain (both resolve to 127.0.0.1 inside Chromium only). tokensvc runs over mTLS
with a caller policy under which the backend may Issue and Revoke and lists sessions only
with the user's own token. Access tokens live 5 minutes here and there is no revocation
feed: a revoked session's token is still valid locally, so only tokensvc's own answer can
tell.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ServerThread, settings_for
from tests.support.topology import prefer_system
from tests.web.browser_support import (
    CSRF,
    HOST_RULES,
    SESSION,
    WAIT,
    SiblingSite,
    chrome,
    cookie,
)
from tokensvc.cli.devcerts import write_dev_pki
from tokensvc.redis.embedded import RedisProcess

pytestmark = pytest.mark.timeout(120)

POLICY = """
[rpc.Issue]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
[rpc.Revoke]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[SiblingSite]:
    tmp = tmp_path_factory.mktemp("web-sibling")
    certs = tmp / "certs"
    pki = write_dev_pki(certs)
    (tmp / "policy.toml").write_text(POLICY)
    redis = RedisProcess(tmp / "redis", prefer_system=prefer_system()).start()
    settings = settings_for(
        redis.url,
        tmp / "data",
        access_ttl=300,
        insecure=False,
        tls_cert=pki["server"].cert,
        tls_key=pki["server"].key,
        tls_client_ca=pki["server"].ca,
        policy_file=tmp / "policy.toml",
    )
    tokensvc = ServerThread(settings)
    login = pki["login"]
    try:
        app = SiblingSite(tokensvc, certs, {"ca": login.ca, "cert": login.cert, "key": login.key})
    except BaseException:
        tokensvc.stop()
        redis.stop()
        raise
    yield app
    app.stop()
    tokensvc.stop()
    redis.stop()


@pytest.fixture(scope="module")
def browsers(site, tmp_path_factory) -> Iterator[tuple[webdriver.Chrome, webdriver.Chrome]]:
    """Two browser profiles (two people, or one person's laptop and phone)."""
    drivers: list[webdriver.Chrome] = []
    try:
        for name in ("profile-a", "profile-b"):
            profile = tmp_path_factory.mktemp(name)
            rules = f"--host-resolver-rules={HOST_RULES}"
            drivers.append(chrome(profile, site.certs / "server.pem", rules))
        yield drivers[0], drivers[1]
    finally:
        for driver in drivers:
            driver.quit()


def _shown(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def test_a_sibling_host_cannot_shadow_the_session_or_csrf_cookie(browsers, site):
    victim, attacker = browsers
    site.login(attacker, "mallory")  # the attacker is a user too: a cookie of this backend
    planted = cookie(attacker, SESSION)["value"]
    site.login(victim, "alice")
    real = cookie(victim, SESSION)["value"]
    real_csrf = cookie(victim, CSRF)["value"]
    alice_sid = _shown(victim, "sid")
    chosen = "A" * 43  # a double-submit token the attacker would like the victim to use

    # the victim visits a page of the sibling host, which sets look-alike cookies for the
    # parent domain: to Chromium these are not __Host- names, so it stores them
    site.plant(
        victim,
        f"\xa0{SESSION}={planted}; Domain=example.test; Path=/; Secure",
        f"\xa0{CSRF}={chosen}; Domain=example.test; Path=/; Secure",
    )
    stored = victim.execute_cdp_cmd("Network.getAllCookies", {})["cookies"]
    assert {c["value"] for c in stored if c["domain"] == ".example.test"} == {planted, chosen}

    site.recorder.cookies.clear()
    victim.get(site.origin)
    # Chromium sent both, the planted one last ...
    [header] = site.recorder.cookies
    assert header.index(f"{SESSION}={real}".encode()) < header.index(
        f"\xa0{SESSION}={planted}".encode("latin-1")
    )
    # ... and the victim is still themself, with their own double-submit token
    assert victim.title == "Home"
    assert _shown(victim, "subject") == "alice" and _shown(victim, "sid") == alice_sid
    assert victim.find_element(By.NAME, "csrf_token").get_attribute("value") == real_csrf
    assert cookie(victim, SESSION)["value"] == real  # not cleared, not replaced
    victim.get(f"{site.origin}/devices")
    row = victim.find_element(By.CSS_SELECTOR, 'tr[aria-current="true"]')
    assert row.find_element(By.NAME, "session_id").get_attribute("value") == alice_sid
    # the victim's own form posts keep working beside the planted CSRF cookie
    row.find_element(By.TAG_NAME, "button").click()  # sign out this device
    WebDriverWait(victim, WAIT).until(lambda d: d.title == "Sign in")
    assert cookie(victim, SESSION) is None


def test_a_session_revoked_elsewhere_is_signed_out_not_an_error(browsers, site):
    laptop, phone = browsers
    site.login(phone, "carol")
    site.login(laptop, "carol")
    laptop.get(f"{site.origin}/devices")
    assert len(laptop.find_elements(By.CSS_SELECTOR, "tbody tr")) == 2
    laptop.find_element(By.CSS_SELECTOR, "button.danger").click()  # sign out everywhere
    WebDriverWait(laptop, WAIT).until(lambda d: d.title == "Sign in")

    # the phone's access token is still valid (minutes), and no feed tells the backend;
    # ListSessions at tokensvc refuses it: the phone is signed out, not shown an error
    phone.get(f"{site.origin}/devices")
    WebDriverWait(phone, WAIT).until(lambda d: d.title == "Sign in")
    assert cookie(phone, SESSION) is None
    phone.get(site.origin)
    assert phone.title == "Sign in"
