"""WebSocket of protection: live progress of workflow runs, and protect/unprotect for Administrators.

A page following runs connects to ``/ws/protection/?runs=1,2`` and receives each run's card
(HTML with a stable id, swapped in by htmx) whenever a step moves. A client may also send
``{"action": "protect", "vm": …, "level": 1, "settings": {…}}`` or
``{"action": "unprotect", "protection": …}``: the same service as the API runs it, with the same
rules (Operators are refused).
"""
from __future__ import annotations

import logging
from urllib.parse import parse_qs

from asgiref.sync import async_to_sync
from channels.generic.websocket import WebsocketConsumer
from django.core.exceptions import PermissionDenied, ValidationError
from django.template.loader import render_to_string
from django.utils.html import escape

from eac.errors import Conflict, validation_sentence
from eac.permissions import socket_user_now, user_can_view
from eac.realtime import CLOSE_FORBIDDEN, client_message, run_group, user_group
from inventory.models import VM

from . import services
from .models import Protection, WorkflowRun

log = logging.getLogger(__name__)

MAX_RUNS = 50
MAX_MESSAGE = 16_384


def _result(ok: bool, message: str, run: int | None = None) -> str:
    run_attr = f' data-run="{run}"' if run else ""
    return (f'<div id="protection-ws-result" data-ok="{"true" if ok else "false"}"{run_attr} role="status">'
            f"{escape(message)}</div>")


class ProtectionConsumer(WebsocketConsumer):
    def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user_can_view(user):
            self.close()  # refused before the handshake completes
            return
        self.user = user
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        ids = []
        for chunk in query.get("runs", []):
            ids.extend(int(i) for i in chunk.split(",") if i.strip().isdigit())
        self.runs = sorted(set(WorkflowRun.objects.filter(pk__in=ids[:MAX_RUNS]).values_list("pk", flat=True)))
        # user.<pk>: access.change when the user's rights change while the socket is open.
        self.groups_joined = [run_group(pk) for pk in self.runs] + [user_group(user.pk)]
        for group in self.groups_joined:
            async_to_sync(self.channel_layer.group_add)(group, self.channel_name)
        self.accept()
        # What happened between the page's render and the socket's opening.
        for pk in self.runs:
            self._send_run(pk)

    def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            async_to_sync(self.channel_layer.group_discard)(group, self.channel_name)

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message = client_message(text_data, max_size=MAX_MESSAGE)
        if message is None or message.get("action") not in ("protect", "unprotect"):
            return
        # A write is checked against the user's rights of now, whether or not access.change got here first.
        self.user = self.scope["user"] = async_to_sync(socket_user_now)(self.scope)
        try:
            if message["action"] == "protect":
                vm = VM.objects.select_related("pool").filter(pk=int(message.get("vm"))).first()
                if vm is None:
                    self.send(text_data=_result(False, "No such VM."))
                    return
                settings = message.get("settings") if isinstance(message.get("settings"), dict) else {}
                run = services.protection_start(vm=vm, level=message.get("level", 1), settings=settings,
                                                requested_by=self.user, via="websocket",
                                                remote_addr=self._client_ip())
            else:
                protection = Protection.objects.filter(pk=int(message.get("protection"))).first()
                if protection is None:
                    self.send(text_data=_result(False, "No such protection."))
                    return
                run = services.protection_stop(protection=protection, requested_by=self.user, via="websocket",
                                               remote_addr=self._client_ip())
        except (TypeError, ValueError):
            self.send(text_data=_result(False, "Give a VM (or protection) id."))
            return
        except PermissionDenied as exc:
            self.send(text_data=_result(False, str(exc)))
            return
        except Conflict as exc:
            self.send(text_data=_result(False, exc.sentence()))
            return
        except ValidationError as exc:
            self.send(text_data=_result(False, validation_sentence(exc)))
            return
        group = run_group(run.pk)
        async_to_sync(self.channel_layer.group_add)(group, self.channel_name)
        self.groups_joined.append(group)
        self.send(text_data=_result(True, f"{run.get_kind_display()} started.", run.pk))

    def _client_ip(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    def _send_run(self, pk: int) -> None:
        run = WorkflowRun.objects.select_related("pool", "vm", "created_by").filter(pk=pk).first()
        if run is not None:
            self.send(text_data=render_to_string("protection/fragments/run_card.html", {"run": run}))

    def access_change(self, event: dict) -> None:
        """The user's rights changed: closed (4403) if they may no longer see protection; else the rights of
        now are the ones protect and unprotect are checked against."""
        user = async_to_sync(socket_user_now)(self.scope)
        if not user_can_view(user):
            self.close(code=CLOSE_FORBIDDEN)
            return
        self.user = self.scope["user"] = user

    def protection_progress(self, event: dict) -> None:
        try:
            self._send_run(int(event.get("run")))
        except (TypeError, ValueError):
            return
