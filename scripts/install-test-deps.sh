#!/usr/bin/env bash
# Install the Debian packages that mailrelay's integration tests talk to, when any is missing,
# and make sure the local PostgreSQL answers (when there is one).
#
# Real peers, never fakes: Postfix (smtp-sink, smtp-source, a private postfix instance), swaks
# (+ the Perl TLS modules it needs for STARTTLS), OpenLDAP slapd + ldap-utils, NSD, and two DKIM
# verifiers (Perl's Mail::DKIM, OpenDKIM's test mode). Nothing is
# configured or started system-wide: policy-rc.d stops the packages' own daemons from starting,
# debconf answers keep postfix/slapd from asking questions. Tests start their own instances in
# temp dirs on loopback.
#
# Idempotent and quick when everything is there (no apt-get at all). Needs root to install;
# without it, it only warns (the tests that need a missing peer skip).
set -euo pipefail

PACKAGES=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl slapd ldap-utils nsd libmail-dkim-perl opendkim)

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
else
  echo "install-test-deps: not a Debian system (no dpkg-query); skipping package installs" >&2
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: missing ${missing[*]}; not root, so not installing them" \
         "(tests that need them will skip)" >&2
  else
    echo "install-test-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No daemon may start by itself during the install: only the tests start peers.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
    fi
    debconf-set-selections <<'DEBCONF'
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string localhost.localdomain
postfix postfix/destinations string localhost.localdomain, localhost
postfix postfix/mynetworks string 127.0.0.0/8 [::1]/128
postfix postfix/protocols select all
slapd slapd/no_configuration boolean true
DEBCONF
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
  fi
fi

# PostgreSQL at 127.0.0.1:5432 (the shared-queue tests use it): start the local cluster if it is
# installed but not answering. Harmless where there is none.
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_up && [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  for v in $(ls /etc/postgresql); do
    echo "install-test-deps: starting PostgreSQL $v"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
  for _ in $(seq 50); do pg_up && break; sleep 0.2; done
fi
exit 0
