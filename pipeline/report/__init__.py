"""The static HTML review report: summary, group pages, failed files (``neardup report``).

:mod:`.data` gathers the tables in Spark, :mod:`.pages` shapes and renders them with jinja2
(autoescaped: file names from archives are hostile), :mod:`.plot` draws the similarity
histogram, :mod:`.build` is the job (thumbnails, pages, MLflow artifact).
"""
