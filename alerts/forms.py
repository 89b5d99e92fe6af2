"""The recipients page's form: one POST carries an action and what it needs, parsed before any lookup."""
from __future__ import annotations

from django import forms

from .choices import SUBSCRIBABLE


class RecipientActionForm(forms.Form):
    action = forms.ChoiceField(choices=[("add", "Add"), ("update", "Update"), ("delete", "Remove"),
                                        ("test", "Send a test alert")])
    pk = forms.IntegerField(required=False, min_value=1, max_value=2**31 - 1)
    # The address itself is checked by the service (the API's path too).
    email = forms.CharField(required=False, max_length=254, strip=True)
    name = forms.CharField(required=False, max_length=200)
    conditions = forms.MultipleChoiceField(choices=[(c.value, c.label) for c in SUBSCRIBABLE], required=False)
    enabled = forms.BooleanField(required=False)

    def clean(self):
        data = super().clean()
        if data.get("action") in ("update", "delete") and not data.get("pk"):
            raise forms.ValidationError("Say which recipient.")
        return data

    def error_sentence(self) -> str:
        return " ".join(m for messages in self.errors.values() for m in messages)
