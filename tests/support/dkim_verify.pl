# Verify the DKIM signatures of the message on standard input with Perl's Mail::DKIM, fetching the
# keys from the DNS server on 127.0.0.1, port ARGV[0] (the tests' NSD). One line per signature:
# "domain algorithm result [detail]".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my ($port) = @ARGV;
die "usage: dkim_verify.pl DNS-PORT < message\n" unless $port;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 0, retry => 2,
    udp_timeout => 5, tcp_timeout => 5));
my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN;
local $/;
$verifier->PRINT(scalar <STDIN>);
$verifier->CLOSE;
for my $sig ($verifier->signatures) {
    print join(' ', $sig->domain, $sig->algorithm, $sig->result_detail), "\n";
}
