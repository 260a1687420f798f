from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay", "mailrelay.tap", "mailrelay: a mail transfer agent on Twisted", "mailrelay"
)
