"""The one selection every page shares, kept in ``st.session_state`` and in the URL.

The selection is: the base and the fine-tunes (as specs: ``demo:...``, ``upload:<sha256>``,
hub ids or paths), the fine-tune shown by single-model views (``model``), the second one
for subspace similarity (``other``), the matrix (a tensor name of the base), ``k`` and
``eps``. Each lives under a canonical session key (``sel_<name>``) that no widget owns,
so it survives pages that do not show its widget; widgets are bound to it with
:func:`widget`. Every run writes the selection to ``st.query_params`` (the page is the URL
path), so the address bar always reproduces the current view for anyone on the same
server, and a new session starts from the URL it was opened with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from analysis.results import DEFAULT_EPSILON, DEFAULT_TOP_K

NAMES = ("base", "tuned", "model", "other", "matrix", "k", "eps")
MAX_K = 100
EPS_STEP = 0.05


@dataclass(frozen=True)
class Selection:
    base: str
    tuned: tuple[str, ...]
    model: str | None
    other: str | None
    matrix: str | None
    k: int
    eps: float

    @property
    def complete(self) -> bool:
        """A base and at least one fine-tune are chosen."""
        return bool(self.base and self.tuned)


def _key(name: str) -> str:
    return f"sel_{name}"


def _parse_k(text: str | None) -> int:
    try:
        return min(MAX_K, max(1, int(text)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_TOP_K


def _parse_eps(text: str | None) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_EPSILON
    if value != value:  # NaN
        return DEFAULT_EPSILON
    return round(min(0.95, max(EPS_STEP, round(value / EPS_STEP) * EPS_STEP)), 2)  # on the slider's grid


def load(defaults: Callable[[], tuple[str, list[str]]]) -> None:
    """Fill the selection once per session: from the URL, else from ``defaults()``.

    ``defaults`` returns ``(base, tuned)`` (the offline demo when it is built).
    """
    if st.session_state.get("sel_loaded"):
        return
    params = st.query_params
    base = (params.get("base") or "").strip()
    tuned = [t for t in params.get_all("tuned") if t.strip()]
    if not base:
        base, tuned = defaults()
    st.session_state[_key("base")] = base
    st.session_state[_key("tuned")] = list(dict.fromkeys(tuned))
    st.session_state[_key("model")] = params.get("model") or None
    st.session_state[_key("other")] = params.get("other") or None
    st.session_state[_key("matrix")] = params.get("matrix") or None
    st.session_state[_key("k")] = _parse_k(params.get("k"))
    st.session_state[_key("eps")] = _parse_eps(params.get("eps"))
    st.session_state.sel_loaded = True


def ensure_app_navigation() -> None:
    """Make sure the page runs inside ``app.py``'s ``st.navigation``.

    Streamlit keeps a relic of its first multipage API: until some run has called
    ``st.navigation``, a server whose main script sits next to a ``pages/`` folder runs
    ``pages/<name>.py`` *directly* for a URL ``/<name>`` (skipping ``app.py``). That
    happens only to the very first request after a start, which for a shared link is a
    deep URL. Turning the relic off and rerunning sends the same URL through ``app.py``
    (page URLs equal the file names, so it lands on the same page). Call it first thing in
    a page's body (never in a callback).
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def current() -> Selection:
    """The selection now, with ``model``/``other`` kept among the chosen fine-tunes."""
    tuned = tuple(st.session_state.get(_key("tuned"), []))
    model = st.session_state.get(_key("model"))
    if model not in tuned:
        model = tuned[0] if tuned else None
    other = st.session_state.get(_key("other"))
    if other not in tuned or other == model:
        other = next((t for t in tuned if t != model), None)
    return Selection(
        base=st.session_state.get(_key("base"), ""),
        tuned=tuned,
        model=model,
        other=other,
        matrix=st.session_state.get(_key("matrix")),
        k=int(st.session_state.get(_key("k"), DEFAULT_TOP_K)),
        eps=float(st.session_state.get(_key("eps"), DEFAULT_EPSILON)),
    )


def get(name: str) -> Any:
    return st.session_state.get(_key(name))


def set(name: str, value: Any) -> None:  # noqa: A001 - reads as state.set("k", 12)
    """Change one part of the selection (call before its widget is drawn, or in a callback)."""
    if name not in NAMES:
        raise KeyError(f"unknown selection part {name!r}; one of {NAMES}")
    st.session_state[_key(name)] = value
    widget_key = f"w_{name}"
    if widget_key in st.session_state:
        st.session_state[widget_key] = value


def widget(factory: Callable[..., Any], label: str, name: str, **kwargs: Any) -> Any:
    """Draw ``factory(label, ...)`` (``st.slider``, ``st.selectbox`` ...) bound to ``name``.

    The widget starts from the canonical value and writes back to it when changed, so
    the value survives pages where the widget is not drawn.
    """
    widget_key = f"w_{name}"
    value = st.session_state.get(_key(name))
    options = kwargs.get("options")
    if options is not None and value not in list(options):
        value = next(iter(options), None) if not isinstance(value, list) else [v for v in value if v in options]
        st.session_state[_key(name)] = value
    # A value assigned through Session State is pushed to the browser and would override
    # what the user is changing right now, so assign only when needed: the value differs,
    # or the widget is new on this page (widgets of another page do not carry over).
    page = st.session_state.get("wse_page")
    page_key = f"wse_widget_page_{name}"
    if st.session_state.get(widget_key) != value or st.session_state.get(page_key) != page:
        st.session_state[widget_key] = value
        st.session_state[page_key] = page

    def copy_back() -> None:
        st.session_state[_key(name)] = st.session_state[widget_key]

    result = factory(label, key=widget_key, on_change=copy_back, **kwargs)
    to_url(current())  # a value fixed up just now (e.g. the first matrix) belongs in the URL too
    return result


def to_url(selection: Selection) -> None:
    """Mirror the selection in ``st.query_params`` (only when it changed)."""
    wanted: dict[str, list[str]] = {}
    if selection.base:
        wanted["base"] = [selection.base]
    if selection.tuned:
        wanted["tuned"] = list(selection.tuned)
    for name in ("model", "other", "matrix"):
        value = getattr(selection, name)
        if value:
            wanted[name] = [value]
    wanted["k"] = [str(selection.k)]
    wanted["eps"] = [f"{selection.eps:g}"]
    for key in PAGE_PARAMS.get(st.session_state.get("wse_page"), ()):  # a page's own view (e.g. Mitigate)
        if key in st.query_params:
            wanted[key] = st.query_params.get_all(key)
    have = {key: st.query_params.get_all(key) for key in st.query_params.keys()}
    if have != wanted:
        st.query_params.from_dict({k: v if len(v) > 1 else v[0] for k, v in wanted.items()})


#: Query parameters a page keeps in the URL beside the selection, by page URL path; the
#: page itself reads and writes them (``mitigate``: lambda, rule, exact rank, trade-off curve).
PAGE_PARAMS: dict[str, tuple[str, ...]] = {"mitigate": ("lam", "rule", "exact", "curve")}
