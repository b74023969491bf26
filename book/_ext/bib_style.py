"""Bibliography labels that match the author-year citations in the text.

The chapters cite as "Dumoulin and Visin [2016]" or "[Yang et al., 2019]"
(``bibtex_reference_style = author_year``), but pybtex's styles label the list on
the references page [1], [2], ... This extension registers a pybtex style,
``plain_authoryear``, that sorts like ``plain`` and labels each entry with its
authors and year, so the text and the list name a work the same way.
"""

from __future__ import annotations

import re
import string

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _last_name(person) -> str:
    return re.sub(r"[{}]", "", " ".join(person.prelast_names + person.last_names))


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels such as "Dumoulin and Visin, 2016" or "Yang et al., 2019"."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        # Two works with the same authors and year: 2019a, 2019b.
        for label in set(labels):
            where = [i for i, other in enumerate(labels) if other == label]
            if len(where) > 1:
                for suffix, i in zip(string.ascii_lowercase, where):
                    labels[i] = label + suffix
        return iter(labels)

    @staticmethod
    def _label(entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_last_name(p) for p in persons]
        if not names:
            authors = entry.fields.get("title", entry.key)
        elif len(names) == 1:
            authors = names[0]
        elif len(names) == 2:
            authors = f"{names[0]} and {names[1]}"
        else:
            authors = f"{names[0]} et al."
        return f"{authors}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(PlainStyle):
    default_label_style = "authoryear"


def setup(app) -> dict:
    register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", "plain_authoryear", AuthorYearStyle)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
