"""A spool on a real, tiny tmpfs: a full disk fails the commit with 452 4.3.1, leaves nothing
half-written, and the spool works again as soon as there is room."""

from __future__ import annotations

import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import TemporaryFailure
from mailrelay.queue.spool import FilesystemSpool

ENV = Envelope("s@example.org", (Recipient("r@example.test"),))


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def leftovers(spool: FilesystemSpool) -> list[str]:
    return sorted(os.listdir(spool.tmp_dir)) + sorted(os.listdir(spool.queue_dir))


@pytest_twisted.inlineCallbacks
def test_disk_full_fails_with_452_leaves_nothing_and_recovers(tiny_disk):
    spool = FilesystemSpool(str(tiny_disk / "spool"), reactor)
    spool.start()
    try:
        # bigger than the disk: fails while streaming in (a buffered write on the reactor thread)
        w = spool.open(ENV)
        for _ in range(40):
            w.write(b"x" * 65536)
        with pytest.raises(TemporaryFailure) as e:
            yield w.commit()
        assert (e.value.reply.code, e.value.reply.enhanced) == (452, "4.3.1")
        assert leftovers(spool) == []

        # fill the disk to the last byte: small messages fail at commit, in the writer thread
        ballast = tiny_disk / "ballast"
        with open(ballast, "wb", buffering=0) as f:
            for size in (4096, 1):
                try:
                    while True:
                        f.write(b"b" * size)
                except OSError:
                    pass
        failures = 0
        for _ in range(3):
            w = spool.open(ENV)
            w.write(b"y" * 100)
            try:
                yield w.commit()
            except TemporaryFailure as e:
                assert e.reply.code == 452
                failures += 1
        assert failures == 3
        assert leftovers(spool) == []

        os.unlink(ballast)  # room again: the same spool accepts mail
        w = spool.open(ENV)
        w.write(b"Subject: fine\r\n\r\nok\r\n")
        qid = yield w.commit()
        assert (yield spool.list_ids()) == [qid]
    finally:
        yield spool.stop()


@pytest.mark.integration
def test_relay_with_a_full_spool_answers_452_and_keeps_serving(tiny_disk, smtp_sink):
    import smtplib
    import tempfile
    from pathlib import Path

    from tests.support.relay import RelayProcess

    home = Path(tempfile.mkdtemp(prefix="mailrelay-relay-"))
    (tiny_disk / "spool").mkdir()
    (home / "spool").symlink_to(
        tiny_disk / "spool"
    )  # the spool on the tiny disk, the log elsewhere
    relay = RelayProcess(
        '[server]\nmax_message_size = "8M"\n'
        f'[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = ["127.0.0.1:{smtp_sink.port}"]\n',
        directory=home,
    ).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            big = b"Subject: too big for the disk\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2000
            client.ehlo("client.example.org")
            client.mail("s@example.org")
            client.rcpt("r@example.test")
            code, text = client.data(big)
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            assert not [
                p
                for p in (tiny_disk / "spool").rglob("*")
                if p.is_file() and p.name != "control.sock"
            ]
            # the same session goes on, and a message that fits is accepted and delivered
            client.sendmail("s@example.org", ["r@example.test"], b"Subject: small\r\n\r\nfits\r\n")
        smtp_sink.wait_for(1)
        assert b"Subject: small" in smtp_sink.messages()[0]
    finally:
        relay.cleanup()
