"""What intake adds once (a DKIM signature) stays with the message in the PostgreSQL store:
committed, kept by each save and by a rewrite in SQL, read after a restart and by the offline
reader. (The spool and the memory store: tests/unit/queue/test_store_prefix.py.)"""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support.queue.prefix import LARGE, PREFIX, commit


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_the_postgresql_store_keeps_the_prefix_through_saves_and_a_restart(tmp_path):
    from mailrelay.queue.postgres import PostgresStore
    from mailrelay.queue.postgres.offline import PostgresQueueReader
    from tests.support.pgserver import temp_schema

    with temp_schema() as dsn:
        store = PostgresStore(dsn, reactor, cache_dir=str(tmp_path / "c1"))
        store.start()
        try:
            qid = yield commit(store, LARGE)
            message = yield store.load(qid)
            assert message.prefix == PREFIX
            yield store.save(attrs.evolve(message, attempts=1))
            with store.open_body(qid) as f:
                assert f.read() == LARGE
        finally:
            yield store.stop()
        again = PostgresStore(dsn, reactor, cache_dir=str(tmp_path / "c2"))
        again.start()
        try:
            loaded = yield again.load(qid)
            assert (loaded.prefix, loaded.attempts) == (PREFIX, 1)
            assert [m.prefix for m in (yield again.load_many([qid]))] == [PREFIX]
            yield again.make_due(qid)  # rewrites the state in SQL (jsonb)
            assert (yield again.load(qid)).prefix == PREFIX
        finally:
            yield again.stop()
        reader = PostgresQueueReader(dsn)
        try:
            assert reader.read_message(qid).prefix == PREFIX
        finally:
            reader.close()
