"""What a store can do beyond ``IQueueStore`` is declared, and only what is declared is used."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyClass

from mailrelay.config import QueueConfig
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import (
    IBatchLoader,
    ILeasingStore,
    IOfflineQueue,
    IOfflineSharedQueue,
    IQueueStore,
    IScheduleLoader,
    IStartableStore,
)
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.sharing import LocalQueue, SharedQueue, sharing_for
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer

ENV = Envelope("a@example.org", (Recipient("b@example.test"),))


@pytest.mark.parametrize(
    "interface",
    [IQueueStore, IStartableStore, IScheduleLoader, IBatchLoader, IOfflineQueue],
)
def test_the_spool_declares_and_has_each_ability(interface):
    assert verifyClass(interface, FilesystemSpool)


@pytest.mark.parametrize(
    "interface",
    [IQueueStore, ILeasingStore, IStartableStore, IScheduleLoader, IBatchLoader],
)
def test_the_postgresql_store_declares_and_has_each_ability(interface):
    from mailrelay.queue.postgres import PostgresStore

    assert verifyClass(interface, PostgresStore)


def test_the_postgresql_reader_is_the_offline_shared_queue():
    from mailrelay.queue.postgres import PostgresQueueReader

    assert verifyClass(IOfflineSharedQueue, PostgresQueueReader)


def test_the_memory_store_declares_no_optional_ability():
    store = MemoryQueueStore()
    assert IQueueStore.providedBy(store)
    for interface in (ILeasingStore, IStartableStore, IScheduleLoader, IBatchLoader):
        assert not interface.providedBy(store)


class _WithSchedule(MemoryQueueStore):
    """Has a ``load_schedule`` method; whether it is used depends on declaring it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.schedule_loads = 0

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        self.schedule_loads += 1
        return defer.succeed([(q, m.next_attempt, m.held) for q, m in self.messages.items()])


@implementer(IScheduleLoader)
class _DeclaredSchedule(_WithSchedule):
    pass


@pytest.mark.parametrize(("store_class", "loads"), [(_WithSchedule, 0), (_DeclaredSchedule, 1)])
def test_recovery_reads_the_schedule_in_one_pass_only_from_a_store_that_declares_it(
    store_class, loads
):
    clock = Clock()
    store = store_class(clock)
    queued = [store.inject(ENV, b"x\r\n") for _ in range(3)]
    manager = QueueManager(
        store, FakeRouter({}), RecordingDeliverer(), clock, QueueConfig(), "h.test"
    )
    found: list[int] = []
    manager.start().addCallback(found.append)
    assert found == [3] and store.schedule_loads == loads
    assert set(manager.scheduled()) == set(queued)


def test_the_manager_shares_the_queue_only_with_a_leasing_store():
    assert isinstance(sharing_for(MemoryQueueStore()), LocalQueue)

    @implementer(ILeasingStore)
    class Leasing(MemoryQueueStore):
        pass

    assert isinstance(sharing_for(Leasing()), SharedQueue)
