"""Weight-spectrum explorer: ``streamlit run app.py``.

Declares the pages (``st.navigation``) and loads the shared selection (from the URL for a
shared link, else the offline demo). Each page in ``pages/`` reads the selection, asks
the engine (``analysis``) and draws; the analyses themselves run in a background job
manager shared by every visitor (``ui.runtime``).

A bad ``WSE_*`` setting, or bad input no page caught, is one plain line in the page (an
:class:`~analysis.errors.InputError` caught here), never Streamlit's redacted exception.
"""

from __future__ import annotations

import streamlit as st

# The first paint: the page's title and the titled page list come before anything heavy is
# imported or read (on a cold server, importing the engine takes seconds). Streamlit's own
# sidebar list is off (.streamlit/config.toml, client.showSidebarNavigation): before the
# first st.navigation of a server it would list the files of pages/ by name.
st.set_page_config(page_title="Weight-spectrum explorer", page_icon="📈", layout="wide")

PAGES = {
    "Explore": [
        # The default page is served at "/" only (Streamlit ignores its url_path), so a
        # hidden twin serves /overview: every page's URL works when opened directly.
        st.Page("pages/overview.py", title="Overview", icon=":material/grid_view:", url_path="home", default=True),
        st.Page("pages/overview.py", title="Overview", url_path="overview", visibility="hidden"),
        st.Page(
            "pages/similarity.py", title="Singular-vector similarity", icon=":material/blur_on:", url_path="similarity"
        ),
        st.Page("pages/intruders.py", title="Intruders vs ε", icon=":material/show_chart:", url_path="intruders"),
        st.Page(
            "pages/effective_rank.py",
            title="Effective rank",
            icon=":material/signal_cellular_alt:",
            url_path="effective_rank",
        ),
        st.Page("pages/spectrum.py", title="Spectrum", icon=":material/stacked_line_chart:", url_path="spectrum"),
        st.Page("pages/subspace.py", title="Subspace similarity", icon=":material/join_inner:", url_path="subspace"),
        st.Page("pages/series.py", title="Checkpoint series", icon=":material/timeline:", url_path="series"),
        st.Page("pages/rl_measures.py", title="RL vs SFT", icon=":material/compare_arrows:", url_path="rl_measures"),
        st.Page("pages/mitigate.py", title="Mitigate", icon=":material/healing:", url_path="mitigate"),
    ],
    "Setup": [st.Page("pages/models.py", title="Models", icon=":material/folder_open:", url_path="models")],
}

page = st.navigation(PAGES, position="hidden")
with st.sidebar:
    for section, members in PAGES.items():
        st.caption(section)
        for member in members:
            if member.visibility != "hidden":
                st.page_link(member, label=member.title, icon=member.icon)
    selection_line = st.empty()
title = st.empty()
title.title(page.title)  # until the page draws its own

from streamlit import runtime as streamlit_runtime  # noqa: E402

if streamlit_runtime.exists():  # a server (not AppTest): its analysis workers start importing now
    from ui import early  # noqa: E402

    early.start_workers()

from analysis.errors import InputError  # noqa: E402
from ui import demo_build, runtime, state  # noqa: E402
from ui.text import escape_markdown  # noqa: E402

try:
    runtime.check_settings()
except InputError as exc:  # the server's own configuration: say which variable, and stop
    st.error(escape_markdown(str(exc)))
    st.caption("This server's settings need fixing (docs/hosting.md, Limits); nothing else runs until then.")
    st.stop()
# A session opened without a link naming models starts on the demo; on a server that has
# none yet, the demo builds in the background and the selection grows with each fine-tune.
opened_on_demo = not st.session_state.get("sel_loaded") and not st.query_params.get("base")
state.load(runtime.demo_defaults)
demo_build.ensure_demo(follow=opened_on_demo)
demo_build.follow_demo()

st.session_state.wse_page = page.url_path
selection = state.current()
# Written before the page runs: pages may st.stop(), and every change of the selection
# happens in widget callbacks, which run before the script.
state.to_url(selection)

with selection_line.container():
    if selection.complete:
        resolver = runtime.resolver()
        st.caption(
            f"**Base:** {escape_markdown(resolver.label(selection.base))}  \n**Fine-tunes:** "
            + ", ".join(escape_markdown(resolver.label(t)) for t in selection.tuned)
        )
    st.caption("The address bar holds this exact view: copy it to share.")

state.mark_app_run()
title.empty()
try:
    page.run()
except InputError as exc:  # bad input a page did not catch: a plain line, not a redacted traceback
    st.error(escape_markdown(runtime.friendly(str(exc))))
