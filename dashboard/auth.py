"""Login for the dashboard: a password kept only as a scrypt hash, or Streamlit's OIDC.

The hash comes from ``$FEDCARE_DASHBOARD_PASSWORD_HASH`` (or the key
``fedcare_dashboard_password_hash`` in Streamlit's secrets); make one with
``fedcare dashboard hash-password``. OIDC is Streamlit's own ``[auth]`` section in
``.streamlit/secrets.toml`` (``st.login``). Either one is checked before any page
renders; the dashboard refuses a non-loopback address when neither is configured.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from pathlib import Path

from fedcare.errors import ConfigError

HASH_ENV = "FEDCARE_DASHBOARD_PASSWORD_HASH"
SECRET_KEY = "fedcare_dashboard_password_hash"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` (salt and hash base64)."""
    if len(password) < 8:
        raise ConfigError("the dashboard password must have at least 8 characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return "$".join(["scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)])


def check_hash_format(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """The parts of a stored hash; ConfigError saying what is wrong otherwise."""
    parts = stored.strip().split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        if n < 2**14 or n & (n - 1) or r < 1 or p < 1 or len(salt) < 16 or len(digest) < 16:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{HASH_ENV} is not a fedcare password hash (expected scrypt$N$r$p$salt$hash; "
                          "make one with `fedcare dashboard hash-password`)") from None
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    n, r, p, salt, digest = check_hash_format(stored)
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(candidate, digest)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


# ------------------------------------------------------------- configuration
def secrets_files() -> list[Path]:
    """Where Streamlit looks for secrets (its ``secrets.files`` option)."""
    from streamlit import config

    return [Path(p) for p in config.get_option("secrets.files")]


def oidc_configured(files: list[Path] | None = None) -> bool:
    """True when a secrets file has Streamlit's ``[auth]`` section with a redirect URI
    and cookie secret (st.login's requirements)."""
    from fedcare.compat import tomllib

    for path in files if files is not None else secrets_files():
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        auth = data.get("auth")
        if isinstance(auth, dict) and auth.get("redirect_uri") and auth.get("cookie_secret"):
            return True
    return False


def password_hash_from_secrets(files: list[Path] | None = None) -> str | None:
    from fedcare.compat import tomllib

    for path in files if files is not None else secrets_files():
        try:
            value = tomllib.loads(Path(path).read_text()).get(SECRET_KEY)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if value:
            return str(value)
    return None


def configured_password_hash() -> str | None:
    return os.environ.get(HASH_ENV) or password_hash_from_secrets()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is only reachable from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise ConfigError(f"--host {host!r} is not an address or a name this machine can resolve") from None
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def require_login_for(host: str) -> str:
    """Which login protects the dashboard on ``host``: "password", "oidc" or "none"
    (loopback only). ConfigError if the address is public and no login is set up."""
    stored = configured_password_hash()
    if stored:
        check_hash_format(stored)
        return "password"
    if oidc_configured():
        return "oidc"
    if not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without a login: set {HASH_ENV} to a hash "
            "from `fedcare dashboard hash-password`, or configure Streamlit's OIDC [auth] in "
            ".streamlit/secrets.toml; or keep the default --host 127.0.0.1")
    return "none"


# -------------------------------------------------------------- in the app
def gate() -> bool:
    """Call before any page renders: True when the viewer may see the dashboard."""
    import time

    import streamlit as st

    stored = configured_password_hash()
    if stored:
        if st.session_state.get("_fedcare_authenticated"):
            return True
        st.title("fedcare dashboard")
        with st.form("login"):
            password = st.text_input("Password", type="password")
            submitted = st.form_submit_button("Log in")
        if submitted:
            if verify_password(password, stored):
                st.session_state["_fedcare_authenticated"] = True
                st.rerun()
            time.sleep(1.0)  # slows down guessing
            st.error("Wrong password.")
        return False
    if oidc_configured():
        if st.user.is_logged_in:
            st.sidebar.caption(f"signed in as {st.user.get('email') or st.user.get('name') or 'user'}")
            st.sidebar.button("Log out", on_click=st.logout)
            return True
        st.title("fedcare dashboard")
        st.button("Log in", on_click=st.login)
        return False
    return True
