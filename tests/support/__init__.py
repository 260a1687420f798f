"""What the tests share: real peers and the relay process (``peers``, ``relay``, ``pgserver``,
``routing.nsd``, ``routing.slapd``, ``delivery.postfix``), in-memory fakes (``smtp.fakes``,
``dkim``), certificates, and the fixtures ``tests/conftest.py`` registers. Nothing here is a
test."""
