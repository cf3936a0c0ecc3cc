"""The one selection every page shares, kept in ``st.session_state`` and in the URL.

The selection is: the base and the fine-tunes (as specs: ``demo:...``,
``upload:<sha256>``, hub ids or paths), the fine-tune shown by single-model views
(``model``), the second one for subspace similarity (``other``), the matrix (its
:attr:`analysis.identity.MatrixId.key`: a tensor name of the base, plus ``#<expert>`` for one
expert of a fused tensor), ``k`` and ``eps``, and the page controls (:data:`CONTROLS`: colour-by,
break-down, module and layer filters, rank measure, log axes, the series page's lines, grid
measure and step, the Mitigate page's lambda, rule, exact rank and curve). This module is the one place a
visitor's view lives: it is read from the visitor's own link once per session and changed
only by the visitor's own widgets and clicks; nothing derived from results (a slider's
range while results stream in, the matrices there are so far) is ever written back into
it. Each part lives under a canonical session key (``sel_<name>``) that no widget owns, so
it survives pages that do not show its widget; widgets are bound to it with
:func:`widget`. Every run writes the selection to ``st.query_params`` (the page is the URL
path), so the address bar always reproduces the current view for anyone on the same
server, and a new session starts from the URL it was opened with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from analysis.results import DEFAULT_EPSILON, DEFAULT_TOP_K

NAMES = ("base", "tuned", "model", "other", "matrix", "k", "eps", "series")
MAX_K = 100
EPS_STEP = 0.05

#: Page controls that are part of the view too (colour-by, break-down, filters, rank
#: measure, log axes; the series page's trend lines, grid measure and step; the Mitigate page's
#: lambda, rule, exact rank and trade-off curve): name -> default. A list-valued one (``LISTS``) is
#: ``None`` for "all options" and is written to the URL only when it differs from its
#: default. A control whose value is not text is read from the URL by :data:`PARSERS` and
#: written by :func:`_url_text`.
CONTROLS: dict[str, Any] = {
    "metric": None,
    "by": None,
    "measure": None,
    "modules": None,
    "layers": None,
    "stacks": None,
    "lines": None,
    "grid": None,
    "lam": None,
    "rule": None,
    "exact": None,
    "curve": None,
    "logrank": None,
    "logamp": None,
    "step": None,
    "rl": None,  # the RL-versus-SFT page's grid measure
}
LISTS = ("modules", "layers", "stacks")
#: The step of the Mitigate page's lambda slider (its URL value is put on this grid).
LAMBDA_STEP = 0.05


def _parse_lam(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return round(min(1.0, max(0.0, round(value / LAMBDA_STEP) * LAMBDA_STEP)), 2)


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _parse_flag(text: str) -> bool | None:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    return None


#: URL text -> value for the controls that are not text (``None``: the link's value is
#: not understood, so the control keeps its default).
PARSERS: dict[str, Callable[[str], Any]] = {
    "lam": _parse_lam,
    "step": _parse_int,
    **dict.fromkeys(("exact", "curve", "logrank", "logamp"), _parse_flag),
}


def _url_text(value: Any) -> str:
    """A control's value as the URL writes it (``1``/``0`` for a flag, ``0.5`` for a number)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


#: Every part of the view, in URL order.
PARTS = (*NAMES, *CONTROLS)


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
    st.session_state[_key("series")] = params.get("series") or None  # the series shown on its page
    for name in CONTROLS:
        values = params.get_all(name)
        if name in LISTS:
            st.session_state[_key(name)] = [v for v in values if v] if values else None
        else:
            text = (values[0] or None) if values else None
            parse = PARSERS.get(name)
            st.session_state[_key(name)] = parse(text) if parse is not None and text is not None else text
    st.session_state.sel_loaded = True


def ensure_app_navigation() -> None:
    """Make sure the page runs inside ``app.py``'s ``st.navigation``.

    Streamlit keeps a relic of its first multipage API: until some run has called
    ``st.navigation``, a server whose main script sits next to a ``pages/`` folder runs
    ``pages/<name>.py`` *directly* for a URL ``/<name>`` (skipping ``app.py``). That
    happens to every session that starts before the first one has turned it off, which
    for shared links opened at once is several. Turning the relic off and rerunning sends
    the same URL through ``app.py`` (page URLs equal the file names, so it lands on the
    same page). Call it first thing in a page's body (never in a callback).

    The flag is one per server process, so under load a session may find it already
    turned off by another while its own run still came in through the relic: what
    decides is whether ``app.py`` is running this very run (:func:`mark_app_run`), never the
    flag (a page run outside ``app.py`` never loaded the visitor's link).
    """
    from streamlit.runtime.pages_manager import PagesManager

    if not _in_app_run():
        PagesManager.uses_pages_directory = False
        st.rerun()


def mark_app_run() -> None:
    """Mark this script run as coming through ``app.py`` (see :func:`ensure_app_navigation`).

    The mark is the run's own cursor table, which Streamlit replaces at the start of
    every run, so it cannot outlive the run (nor be seen by another session).
    """
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is not None:
        ctx.wse_app_cursors = ctx.cursors  # type: ignore[attr-defined]


def _in_app_run() -> bool:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx is None or getattr(ctx, "wse_app_cursors", None) is ctx.cursors


def current() -> Selection:
    """The selection now, with ``model``/``other`` kept among the chosen fine-tunes."""
    tuned = tuple(get("tuned"))
    model = st.session_state.get(_key("model"))
    if model not in tuned:
        model = tuned[0] if tuned else None
    other = st.session_state.get(_key("other"))
    if other not in tuned or other == model:
        other = next((t for t in tuned if t != model), None)
    return Selection(
        base=get("base"),
        tuned=tuned,
        model=model,
        other=other,
        matrix=get("matrix"),
        k=int(get("k")),
        eps=float(get("eps")),
    )


_DEFAULTS: dict[str, Any] = {"base": "", "tuned": [], "k": DEFAULT_TOP_K, "eps": DEFAULT_EPSILON, **CONTROLS}


def get(name: str) -> Any:
    """One part of this visitor's view (its default when the link named none)."""
    if name not in PARTS:
        raise KeyError(f"unknown view part {name!r}; one of {PARTS}")
    value = st.session_state.get(_key(name))
    return _DEFAULTS.get(name) if value is None else value


def set(name: str, value: Any) -> None:  # noqa: A001 - reads as state.set("k", 12)
    """Change one part of the selection (call before its widget is drawn, or in a callback)."""
    if name not in PARTS:
        raise KeyError(f"unknown view part {name!r}; one of {PARTS}")
    st.session_state[_key(name)] = value
    widget_key = f"w_{name}"
    if widget_key in st.session_state:
        st.session_state[widget_key] = value
        st.session_state[f"wse_assigned_{name}"] = True  # the widget must not take a default too


def widget(
    factory: Callable[..., Any], label: str, name: str, *, default: Any = None, shown: Any = None, **kwargs: Any
) -> Any:
    """Draw ``factory(label, ...)`` (``st.slider``, ``st.selectbox`` ...) bound to ``name``.

    The widget starts from the visitor's view and writes back to it only when the
    visitor changes it, so the value survives pages where the widget is not drawn and
    nothing but the visitor's own link and hands ever sets it. ``default`` is the value
    when the view names none; ``shown`` a value to display instead of the view's (a
    ``k`` beyond the slider's range while results stream in), which is *not* written
    back: the view keeps what its link asked for. A list part that is ``None`` means
    every option.
    """
    widget_key = f"w_{name}"
    value = get(name)
    if value is None:
        value = default
    options = kwargs.get("options")
    every = name in LISTS and value is None
    if every:
        value = list(options or [])
    if shown is not None:
        value = shown
    if options is not None and isinstance(value, list):
        value = [v for v in value if v in list(options)]
    if options is not None and not isinstance(value, list) and value not in list(options):
        # Not an option (yet: results may still be streaming in): show the first, and
        # keep the view as its link said; only a view that named nothing takes it.
        if get(name) is None and shown is None:
            st.session_state[_key(name)] = next(iter(options), None)
        value = next(iter(options), None)
    # The widget's own default is always the view's value: a browser that draws the widget
    # afresh (a new tab, a run cut short by a rerun before its message arrived) shows it,
    # where a widget without one would show its minimum (k = 1, eps = 0.05) and send that
    # back. Session State is assigned only where the widget already holds another value
    # (the view changed in a callback), which Streamlit forbids together with a default.
    page = st.session_state.get("wse_page")
    page_key = f"wse_widget_page_{name}"
    held = st.session_state.get(widget_key)
    assigned = st.session_state.pop(f"wse_assigned_{name}", False)
    if assigned or (held is not None and (held != value or st.session_state.get(page_key) != page)):
        st.session_state[widget_key] = value
    else:
        kwargs.update(_default_argument(factory, value, options))
    st.session_state[page_key] = page

    def copy_back() -> None:
        chosen = st.session_state[widget_key]
        if name in LISTS and options is not None and list(chosen) == list(options):
            chosen = None  # every option: the default, kept out of the URL
        st.session_state[_key(name)] = chosen

    result = factory(label, key=widget_key, on_change=copy_back, **kwargs)
    to_url(current())  # a value fixed up just now (e.g. the first matrix) belongs in the URL too
    return result


def _default_argument(factory: Callable[..., Any], value: Any, options: Any) -> dict[str, Any]:
    """``value`` as ``factory``'s own default argument (``value``, ``index`` or ``default``)."""
    name = getattr(factory, "__name__", "")
    if name in ("slider", "select_slider", "text_input", "number_input", "checkbox", "toggle"):
        return {"value": value}
    if name in ("selectbox", "radio"):
        choices = list(options or [])
        return {"index": choices.index(value) if value in choices else (0 if choices else None)}
    if name in ("multiselect", "segmented_control", "pills"):
        return {"default": value}
    return {}


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
    series = st.session_state.get(_key("series"))
    if series and series in selection.tuned:
        wanted["series"] = [series]
    wanted["k"] = [str(selection.k)]
    wanted["eps"] = [f"{selection.eps:g}"]
    for name in CONTROLS:
        value = st.session_state.get(_key(name))
        if value is None:
            continue
        if name in LISTS:
            wanted[name] = [str(v) for v in value] or [""]
        else:
            wanted[name] = [_url_text(value)]
    have = {key: st.query_params.get_all(key) for key in st.query_params.keys()}
    if have != wanted:
        st.query_params.from_dict({k: v if len(v) > 1 else v[0] for k, v in wanted.items()})
