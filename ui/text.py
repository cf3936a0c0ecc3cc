"""Text from outside the server, shown as text.

A model name comes from a shared link, an upload's file name or a model's own files (its
tensor names, its config), and so does every error about it. Streamlit renders Markdown in
most of what it shows (``st.markdown``, ``st.caption``, ``st.error`` and the other alerts,
widget labels, progress texts, tooltips): a name such as ``[Session expired: log in
again](http://attacker/login)`` would be a link inside the page's own red error, and
``![x](http://host/pixel.png)`` would make the visitor's browser fetch that address. Every
such string goes through :func:`escape_markdown` where it meets Markdown; Plotly's subset of
HTML in chart text is :func:`charts.style.chart_text`'s.
"""

from __future__ import annotations

import re

#: Every ASCII punctuation character: CommonMark lets a backslash escape each of them, so
#: none starts emphasis, a link, an image, code, HTML, a heading, a list, a table, an
#: entity, LaTeX (``$``) or a Streamlit directive (``:red[...]``) once escaped.
_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")
#: What text-level plug-ins turn into something else after escapes are read: GitHub's bare
#: links (``http://``, ``www.``, ``name@host``) and emoji or icon short codes (``:smile:``,
#: ``:material/home:``). A word joiner (U+2060, invisible and zero-width) after a ``:``
#: that something follows, after ``@`` and inside ``www.`` breaks each pattern without
#: changing what is seen; a ``:`` before a space or at the end starts none of them and is
#: left alone, so ``name: 12 matrices analysed`` reads (and copies) as it is written.
_TRIGGERS = re.compile(r"(:(?=\S)|@|(?i:www)(?=\.))")
WORD_JOINER = "\u2060"


def escape_markdown(text: object) -> str:
    """``text`` (anything, as ``str``) as Markdown that renders exactly as that text, inline.

    Line breaks become spaces (a name is one line). Use it for every string that comes
    from a link, an upload's name, a model's files or an error about them, wherever it is
    placed into Markdown: ``st.error(f"{escape_markdown(name)} could not be analysed")``.
    Not for widget *options* (``format_func``), which Streamlit shows as plain text.
    """
    flat = " ".join(str(text).splitlines())
    broken = _TRIGGERS.sub(lambda m: m.group(0) + WORD_JOINER, flat)
    return _PUNCTUATION.sub(r"\\\1", broken)
