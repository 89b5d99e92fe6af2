"""Filters every app's FilterSets share, so that a bad value is refused by the form (a 400 naming the filter in
the API; left out, and named, on a page) before the query runs.

An object id (``?pool=3``, ``?vm=12``) is a whole number the database can store, and the OpenAPI schema says
so: a bare ``NumberFilter`` took a decimal, so ``?pool=1.5`` matched pool 1 and ``?pool=-2.1e202`` reached
the database as a 203-digit integer (SQLite: OverflowError, a 500). A boolean is true or false, not "no
filter" when misspelt.
"""
import django_filters
from django import forms
from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema_field

# The largest id of a BigAutoField (DEFAULT_AUTO_FIELD): PostgreSQL's bigint and SQLite's INTEGER.
MAX_ID = 2**63 - 1


def id_schema(description: str = "") -> dict:
    """The OpenAPI schema of an object id, in a path or a filter."""
    schema = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
    return {**schema, "description": description} if description else schema


def _documented(filter_, help_text: str):
    # On the instance: drf-spectacular takes the whole parameter schema (description included) from it.
    return extend_schema_field(id_schema(help_text))(filter_)


class IdFilter(django_filters.NumberFilter):
    """An object id, from 1 to MAX_ID (else a 400 naming the filter); an id that nothing has matches nothing."""

    field_class = forms.IntegerField

    def __init__(self, *args, help_text: str = "", **kwargs) -> None:
        super().__init__(*args, min_value=1, max_value=MAX_ID, help_text=help_text, **kwargs)
        _documented(self, help_text)

    def get_max_validator(self):
        return None  # the field's max_value is the bound


class IdChoiceFilter(django_filters.ModelChoiceFilter):
    """An id of an object that must exist (else a 400 naming the filter), documented with the same bounds."""

    def __init__(self, *args, help_text: str = "", **kwargs) -> None:
        super().__init__(*args, help_text=help_text, **kwargs)
        _documented(self, help_text)


class StrictBooleanSelect(forms.NullBooleanSelect):
    """Hands the raw value to the field: NullBooleanSelect alone turns a typo into "no filter"."""

    def value_from_datadict(self, data, files, name):
        return data.get(name)


class StrictNullBooleanField(forms.NullBooleanField):
    """true/false (also 1/0, yes/no, on/off); empty or the select's "unknown" means no filter; else an error."""

    widget = StrictBooleanSelect
    TRUE = frozenset({"true", "1", "yes", "on"})
    FALSE = frozenset({"false", "0", "no", "off"})

    def to_python(self, value):
        if isinstance(value, bool) or value is None:
            return value
        text = str(value).strip().lower()
        if text in ("", "unknown"):
            return None
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValidationError("Enter true or false.", code="invalid")


class BooleanFilter(django_filters.BooleanFilter):
    field_class = StrictNullBooleanField
