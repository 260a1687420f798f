"""Several worker processes sharing the listeners: ``[server] workers = N`` (see docs/workers.rst).

``supervisor``: the process ``twistd mailrelay`` runs then; ``worker``: each worker process;
``shards``: one spool per worker, locked; ``sockets``: bound once, adopted by every worker;
``logs``: workers' log lines through the supervisor; ``metrics``: the instance's summed figures.
"""
