"""The wizard's form: the level and its settings, parsed and bounded as the API's serializer does.

The service (``services.protection_start``) stays the last word (it also serves the API and the
socket); the form turns a page's strings into values it can check, and says which field is wrong.
"""
from __future__ import annotations

from django import forms

from .choices import EPOCH_MS_MAX, EPOCH_MS_MIN, ORDER_MAX, START_DELAY_MAX, Level, RestartPriority

SETTINGS_FIELDS = ("restart_priority", "order", "start_delay", "heartbeat_sr", "failures_to_tolerate",
                   "secondary_host", "epoch_ms")
MIB = 2**20


class ProtectForm(forms.Form):
    level = forms.TypedChoiceField(choices=Level.choices, coerce=int, required=False)
    restart_priority = forms.ChoiceField(choices=RestartPriority.choices, required=False)
    order = forms.IntegerField(min_value=0, max_value=ORDER_MAX, required=False)
    start_delay = forms.IntegerField(min_value=0, max_value=START_DELAY_MAX, required=False)
    heartbeat_sr = forms.CharField(max_length=64, required=False)
    # The upper bound depends on the pool (fewer than its hosts): the service checks it.
    failures_to_tolerate = forms.IntegerField(min_value=0, max_value=1000, required=False)
    # Level 2: the secondary host (blank: the AM peer of the VM's host) and its memory for the VM, in MiB
    # on the page (bytes in the API); the service checks both against the VM and the pool.
    secondary_host = forms.CharField(max_length=64, required=False, label="Secondary host")
    secondary_memory_mib = forms.IntegerField(min_value=1, max_value=2**24, required=False,
                                              label="Secondary memory (MiB)")
    # Level 3: the time between two checkpoints (blank: the default, choices.EPOCH_MS_DEFAULT).
    epoch_ms = forms.IntegerField(min_value=EPOCH_MS_MIN, max_value=EPOCH_MS_MAX, required=False,
                                  label="Epoch length (ms)")

    def level_or_default(self) -> int:
        return self.cleaned_data.get("level") or Level.BASIC_RESTART

    def protect_settings(self) -> dict:
        """The settings given and valid, for the service (a field left empty takes its default there)."""
        data = getattr(self, "cleaned_data", {})
        out = {k: data[k] for k in SETTINGS_FIELDS if data.get(k) not in (None, "")}
        if data.get("secondary_memory_mib"):
            out["secondary_memory"] = data["secondary_memory_mib"] * MIB
        return out

    def error_sentences(self) -> list[str]:
        return [f"{self.fields[name].label or name.replace('_', ' ').capitalize()}: {' '.join(errors)}"
                for name, errors in self.errors.items()]
