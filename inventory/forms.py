"""Forms of the inventory: the pool form of the admin (and of any pool page)."""
from django import forms
from django.core.exceptions import ValidationError

from .models import Pool
from .services import PoolProbe, pool_create, pool_probe, pool_update


class PoolForm(forms.ModelForm):
    """Add or edit a pool.  The connection is tested in ``clean``; the password is never shown back,
    and left empty on edit it keeps the stored one."""

    url = forms.URLField(
        assume_scheme="https",
        label="URL",
        help_text="URL of the pool master (or of any host of the pool), e.g. https://xcp-master.example.org",
    )
    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        required=False,
        strip=False,
        help_text="Leave empty to keep the stored password.",
    )

    class Meta:
        model = Pool
        fields = ["name", "url", "username", "password", "verify_tls"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe: PoolProbe | None = None
        adding = self.instance.pk is None
        self.fields["password"].required = adding
        if adding:
            self.fields["password"].help_text = ""
        # Never put the stored (decrypted) password in the page.
        self.initial.pop("password", None)

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        url, username = cleaned.get("url", ""), cleaned.get("username", "")
        password = cleaned.get("password") or (self.instance.password if self.instance.pk else "")
        verify_tls = cleaned.get("verify_tls", True)
        editing = self.instance.pk is not None
        unchanged = editing and (url, username, verify_tls) == (
            self.instance.url, self.instance.username, self.instance.verify_tls
        ) and not cleaned.get("password")
        if not unchanged:
            try:
                self.probe = pool_probe(url=url, username=username, password=password, verify_tls=verify_tls)
            except ValidationError as exc:
                self._add_service_error(exc)
        return cleaned

    def _add_service_error(self, exc: ValidationError) -> None:
        if hasattr(exc, "error_dict"):
            for field, errors in exc.error_dict.items():
                self.add_error(field if field in self.fields else None, errors)
        else:
            self.add_error(None, exc)

    def _post_clean(self):
        # The model instance is written by the services, not by construct_instance: an empty
        # password field must not overwrite the stored password.
        pass

    def save(self, commit: bool = True) -> Pool:
        """Create or update through the services (which reuse the connection test of ``clean``)."""
        data = self.cleaned_data
        if self.instance.pk is None:
            self.instance = pool_create(name=data["name"], url=data["url"], username=data["username"],
                                        password=data["password"], verify_tls=data["verify_tls"], probe=self.probe)
        else:
            pool_update(pool=self.instance, name=data["name"], url=data["url"], username=data["username"],
                        password=data.get("password") or None, verify_tls=data["verify_tls"], probe=self.probe)
        return self.instance
