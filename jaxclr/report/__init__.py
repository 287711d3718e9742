"""A run's report page (page.py: figures.py, html.py) and the comparison of
runs (compare.py); `python -m jaxclr.report` (__main__.py)."""
