"""Plotly figures and the tables behind them: results in, figure out (no Streamlit).

- :mod:`charts.figures`: the dashboard's comparison charts;
- :mod:`charts.mitigation`: the Mitigate page's charts;
- :mod:`charts.tables`: the pandas tables every chart and CSV download is drawn from.
"""
