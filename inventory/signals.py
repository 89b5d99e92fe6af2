"""What the inventory announces to the apps built on it (they connect in their ``AppConfig.ready()``).

``batch_committed`` is sent by the watcher after each batch of XAPI changes is committed, from the
watcher's thread, with ``pool`` (the Pool) and ``changed`` ({XAPI class: {uuid, …}}, or None after a
full resync). A receiver must not raise: the watcher logs what it raises and carries on.
"""
import django.dispatch

batch_committed = django.dispatch.Signal()
