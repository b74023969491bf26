"""Launch buttons only when the book's repository URL is set.

``_config.yml`` names Colab and Binder in ``launch_buttons`` and leaves
``repository.url`` for a maintainer to fill in. sphinx-book-theme builds each
chapter's buttons from the repository URL and fails on an empty one, so while it
is empty this extension removes the launch buttons: the site builds, without
buttons, until the URL is set.
"""

from __future__ import annotations

from sphinx.application import Sphinx


def _drop_without_repository(app: Sphinx, config) -> None:
    options = config.html_theme_options
    if not (options.get("repository_url") or "").strip():
        options.pop("launch_buttons", None)
        options.pop("repository_url", None)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _drop_without_repository)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
