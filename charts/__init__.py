"""Plotly figures and the tables behind them: results in, figure out (no Streamlit).

- :mod:`charts.style`: the shared look (colours, line styles, log axes, heatmap reduction);
- :mod:`charts.overview`: the Overview page's grids and totals;
- :mod:`charts.comparison`: the fine-tunes side by side (intruders vs eps and by layer or
  module, effective rank, rank90 and amplification factor by layer);
- :mod:`charts.spectra`: one matrix (similarity heatmap, spectra, subspace similarity);
- :mod:`charts.series`: a checkpoint series against training step;
- :mod:`charts.mitigation`: the Mitigate page's charts and tables;
- :mod:`charts.tables`: the pandas tables every chart and CSV download is drawn from, and
  how fine-tunes and matrices are named and ordered in them;
- :mod:`charts.matrix_tables`: the tables of one matrix (spectra, best matches, subspace);
- :mod:`charts.overview_tables`: where each matrix sits in the overview's grids;
- :mod:`charts.series_tables`: the tables of a checkpoint series.
"""
