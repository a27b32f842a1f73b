#!/usr/bin/env bash
# A local certificate authority, a SuperLink certificate, and SuperNode keys, for TLS and node authentication.
#
#   launchers/make-certs.sh DIR [--nodes N] [--host NAME_OR_IP]...
#
# Writes, in DIR (created 0700):
#   ca.crt, ca.key                 the CA: give ca.crt to every client node (--root-certificates)
#   server.pem, server.key         the SuperLink's certificate, valid for 127.0.0.1, localhost and each --host
#   nodes/node-<i>, node-<i>.pub   N SuperNode key pairs (ECDSA P-384): the private key to node i
#                                  (--auth-private-key), the public one to the server (--auth-public-keys DIR/nodes)
# Needs openssl and ssh-keygen. Bad input: one line, exit 2.
set -euo pipefail

die_usage() { echo "make-certs.sh: $1" >&2; exit 2; }

dir="" nodes=0 hosts=()
while (($#)); do
    case $1 in
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --nodes) (($# >= 2)) && [[ $2 =~ ^[0-9]+$ ]] || die_usage "--nodes needs a whole number"; nodes=$((10#$2)); shift 2 ;;
    --host) (($# >= 2)) && [[ -n $2 && $2 =~ ^[A-Za-z0-9.:-]+$ ]] || die_usage "--host needs a host name or IP address"; hosts+=("$2"); shift 2 ;;
    -*) die_usage "unknown option $1" ;;
    *) [[ -z $dir ]] || die_usage "one directory only, got '$dir' and '$1'"; dir=$1; shift ;;
    esac
done
[[ -n $dir ]] || die_usage "usage: make-certs.sh DIR [--nodes N] [--host NAME_OR_IP]..."
command -v openssl >/dev/null || die_usage "openssl is required"
((nodes == 0)) || command -v ssh-keygen >/dev/null || die_usage "ssh-keygen is required for node keys"
[[ ! -e $dir/ca.key ]] || die_usage "$dir already holds a CA (ca.key): choose another directory"
mkdir -p "$dir/nodes" 2>/dev/null && chmod 700 "$dir" "$dir/nodes" || die_usage "cannot create $dir"

san="IP:127.0.0.1,DNS:localhost"
for host in "${hosts[@]}"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done

umask 077
quiet() { "$@" >/dev/null 2>&1 || { echo "make-certs.sh: failed: $*" >&2; exit 1; }; }
quiet openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=fedgpu local CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
quiet openssl req -newkey rsa:3072 -nodes -subj "/CN=fedgpu SuperLink" -keyout "$dir/server.key" -out "$dir/server.csr"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" >"$dir/server.ext"
quiet openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 365 \
    -extfile "$dir/server.ext" -out "$dir/server.pem"
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
for ((i = 0; i < nodes; i++)); do
    quiet ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedgpu node $i" -f "$dir/nodes/node-$i"
done
chmod 644 "$dir/ca.crt" "$dir/server.pem"
echo "make-certs.sh: CA, SuperLink certificate ($san) and $nodes node key pairs in $dir"
