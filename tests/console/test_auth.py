"""Token authentication (required beyond 127.0.0.1) and the session cookie it gives a browser.

Run: python -m pytest tests/console/test_auth.py -q
"""
import pytest
import requests

from dsaforge.console import Settings, require_token
from dsaforge.console.security import is_loopback
from tests.console.conftest import Served, error_line
from tests.helpers import free_port

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    home = tmp_path_factory.mktemp("auth") / ".dsaforge"
    with Served(Settings(home=home, port=free_port(), token=TOKEN, tracking_uri=f"sqlite:///{home}/mlflow.db")) as s:
        yield s


def test_a_token_is_required_beyond_loopback():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host) and not require_token(Settings(host=host))
    for host in ("0.0.0.0", "::", "10.1.2.3", "console.example"):
        settings = Settings(host=host)
        assert require_token(settings) and len(settings.token) >= 24
    given = Settings(host="0.0.0.0", token="mine")
    assert not require_token(given) and given.token == "mine"


def test_healthz_needs_no_token(guarded):
    assert requests.get(guarded.url + "/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/runs", "/pipelines", "/submit", f"/runs/{'a' * 32}", "/compare?run=x"])
def test_pages_redirect_to_login(guarded, path):
    r = requests.get(guarded.url + path, allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}])
def test_api_answers_401_without_the_token(guarded, headers):
    r = requests.get(guarded.url + "/api/runs", headers=headers, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_posts_without_the_token_change_nothing(guarded):
    before = len(guarded.console.store.list())
    for path in ("/submit", f"/runs/{'a' * 32}/cancel", f"/runs/{'a' * 32}/resume"):
        r = requests.post(guarded.url + path, data={"pipeline_name": "end-to-end"}, allow_redirects=False, timeout=30)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert len(guarded.console.store.list()) == before


def test_bearer_token_works_for_the_api_and_needs_no_csrf(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(guarded.url + "/api/runs", headers=auth, timeout=30).json() == {"runs": []}
    r = requests.post(guarded.url + "/submit", headers={**auth, "Accept": "application/json"},
                      data={"pipeline_name": "end-to-end", "preset": "tiny", "train.sparse.lr": "0"}, timeout=30)
    assert r.status_code == 400 and error_line(r.text) == "config: train.sparse.lr: Input should be greater than 0 (got 0)"


def test_login_sets_a_session_cookie(guarded):
    s = requests.Session()
    page = s.get(guarded.url + "/login?next=/pipelines", timeout=30)
    csrf = s.cookies.get("dsaforge_csrf")
    assert page.status_code == 200 and csrf
    r = s.post(guarded.url + "/login", data={"csrf": csrf, "token": "wrong", "next": "/pipelines"}, timeout=30)
    assert r.status_code == 401 and error_line(r.text) == "wrong token"
    r = s.post(guarded.url + "/login", data={"token": TOKEN, "next": "/pipelines"}, allow_redirects=False, timeout=30)
    assert r.status_code == 403                                   # the login form is CSRF-protected too
    r = s.post(guarded.url + "/login", data={"csrf": csrf, "token": TOKEN, "next": "//evil.example/x"},
               allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/runs"      # no open redirect
    cookie = r.cookies.get("dsaforge_session")
    assert cookie and TOKEN not in cookie
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert s.get(guarded.url + "/pipelines", timeout=60).status_code == 200
    forged = requests.get(guarded.url + "/runs", cookies={"dsaforge_session": "0" * 64}, allow_redirects=False,
                          timeout=30)
    assert forged.status_code == 303


def test_a_token_link_signs_in_and_drops_the_token_from_the_url(guarded):
    s = requests.Session()
    r = s.get(guarded.url + f"/submit?preset=small&token={TOKEN}", allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/submit?preset=small"
    assert s.get(guarded.url + "/submit?preset=small", timeout=60).status_code == 200
    r = requests.get(guarded.url + "/runs?token=wrong", allow_redirects=False, timeout=30)
    assert r.headers["location"].startswith("/login")


def test_cli_refuses_bad_ui_options(tmp_path):
    from dsaforge.cli import main

    assert main(["ui", "--token-file", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").write_text("\n")
    assert main(["ui", "--token-file", str(tmp_path / "empty")]) == 2
    assert main(["ui", "--max-parallel", "0"]) == 2
