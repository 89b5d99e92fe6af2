"""Junk in the query string of the VM table and of the tree's children is never a 500.

Huge numbers, numbers that are not whole, words where numbers go and unknown choices, in every parameter
the pages read: a filter that does not parse is left out (and the table names it), a number out of range is
clamped or refused with a 400, never sent to the database as it is.
"""
import pytest

from tests.inventory.factories import make_host, make_pool, make_vm

HUGE = "99999999999999999999"  # past a 64-bit integer
JUNK_NUMBERS = [HUGE, "-" + HUGE, "9223372036854775808", "-2.1e202", "1.5", "NaN", "abc", "", "1%00",
                "٣"]  # the last is an Arabic-Indic 3, which int() takes
JUNK_WORDS = ["bogus", "%00", "-", "x" * 5000, "%F0%9F%92%A5", "null,null", "RUNNING"]

# {parameter: the junk it gets}; each test sends them all (one request each) and names those that were 500s.
VM_TABLE_JUNK = {
    **dict.fromkeys(("page", "per_page", "pool", "host"), JUNK_NUMBERS),
    **dict.fromkeys(("sort", "status", "power_state", "name"), JUNK_WORDS),
}
VM_TABLE_MIXED = [f"sort=-&per_page={HUGE}&page={HUGE}&pool={HUGE}&host=-1&status=bogus&power_state=Exploded",
                  "page=2&page=abc&pool=1&pool=abc&per_page=25&per_page=1e9"]
TREE_OFFSETS = [*JUNK_NUMBERS, "9223372036854775807", "-1", "0", "3"]


def server_errors(client, urls: list[str]) -> list[str]:
    return [f"{url} -> {status}" for url in urls if (status := client.get(url).status_code) >= 500]


@pytest.fixture
def superuser_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="pw-root-1"))
    return client


@pytest.fixture
def pool(db):
    pool = make_pool()
    host = make_host(pool)
    for _ in range(3):
        make_vm(pool, host=host)
    make_vm(pool)
    return pool


@pytest.mark.parametrize("parameter", [*VM_TABLE_JUNK, "mixed"])
def test_vm_table_answers_junk_in_its_query_string_without_a_500(superuser_client, pool, parameter):
    queries = VM_TABLE_MIXED if parameter == "mixed" else [f"{parameter}={v}" for v in VM_TABLE_JUNK[parameter]]
    assert server_errors(superuser_client, [f"/vms/?{query}" for query in queries]) == []


def test_vm_table_names_the_filters_it_left_out(superuser_client, pool):
    page = superuser_client.get(f"/vms/?pool={HUGE}&host=1.5&status=bogus&power_state=Exploded").content.decode()
    for name in ("pool", "host", "status", "power_state"):
        assert name in page


@pytest.mark.parametrize("key", ["host", "halted-pool", "halted-pk", "pvs-unprotected"])
def test_tree_children_answer_junk_offsets_without_a_500(superuser_client, pool, key):
    host = pool.hosts.first()
    node = {"host": f"host-{host.uuid}", "halted-pool": f"halted-{pool.uuid}", "halted-pk": f"halted-p{pool.pk}",
            "pvs-unprotected": "pvs-unprotected"}[key]
    assert server_errors(superuser_client, [f"/tree/{node}/?offset={offset}" for offset in TREE_OFFSETS]) == []
    assert superuser_client.get(f"/tree/{node}/?offset={HUGE}").status_code == 400


# Well formed, naming nothing: an empty list. Malformed: a 404.
KEYS_OF_NOTHING = [f"halted-p{HUGE}", "halted-p9223372036854775808", "host-ffffffff-ffff-ffff-ffff-ffffffffffff"]
MALFORMED_KEYS = ["pvs-bogus", "host-" + "0" * 36, "pool-p1", "null,null", "%00", "halted-p-1", "halted-p1.5"]


@pytest.mark.parametrize("key", KEYS_OF_NOTHING + MALFORMED_KEYS)
def test_tree_children_of_a_junk_key_are_empty_or_a_404(superuser_client, pool, key):
    response = superuser_client.get(f"/tree/{key}/?offset={HUGE}")
    assert response.status_code in (400, 404)
    response = superuser_client.get(f"/tree/{key}/?offset=0")
    assert response.status_code == (404 if key in MALFORMED_KEYS else 200)
    if response.status_code == 200:
        assert "No VMs" in response.content.decode()
