#!/usr/bin/env bash
# What a production broker for an edgeblock fleet needs besides its config: a CA and a
# server certificate (openssl), and a password per user (mosquitto_passwd). See
# docs/broker.md, "Production broker".
#
#   make-secrets.sh ca DIR NAME [NAME...]
#       DIR/ca.crt, DIR/ca.key: a CA (made once; kept and reused when DIR/ca.key exists)
#       DIR/server.crt, DIR/server.key: the broker's certificate for the host names and IP
#       addresses NAME (the first is its common name), signed by the CA; run again to renew.
#       Boards and the coordinator get DIR/ca.crt only; ca.key never leaves this machine.
#   make-secrets.sh users DIR USER [USER...]
#       A random password for each USER not yet in DIR/edgeblock.passwd: in plain in
#       DIR/passwords/USER (mode 600, the file a client's password_file names) and hashed
#       in DIR/edgeblock.passwd (the broker's password_file). Users already there are kept.
#
# Nothing secret is ever put on a command line. Everything is created mode 600 (umask 077).
set -euo pipefail
umask 077

die() { echo "make-secrets: $*" >&2; exit 2; }

valid_name() { [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; }

san_of() {
    local name entries=()
    for name in "$@"; do
        if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then entries+=("IP:$name"); else entries+=("DNS:$name"); fi
    done
    local IFS=,
    echo "${entries[*]}"
}

make_ca() {
    local dir="$1"
    if [ -f "$dir/ca.key" ]; then
        echo "make-secrets: keeping the CA in $dir/ca.crt"
        return
    fi
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=edgeblock broker CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    echo "make-secrets: CA in $dir/ca.crt (its key $dir/ca.key stays here)"
}

make_server_cert() {
    local dir="$1"; shift
    local ext="$dir/server.ext"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" \
        "subjectAltName=$(san_of "$@")" >"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$1" 2>/dev/null
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -sha256 -days 825 \
        -set_serial "0x$(openssl rand -hex 16)" -extfile "$ext" -out "$dir/server.crt" 2>/dev/null
    rm -f "$dir/server.csr" "$ext"
    chmod 644 "$dir/ca.crt" "$dir/server.crt"
    echo "make-secrets: server certificate in $dir/server.crt for $(san_of "$@")"
}

add_users() {
    local dir="$1"; shift
    local passwd="$dir/edgeblock.passwd" user added=0
    plain="$dir/.new-users"          # global: the EXIT trap removes it whatever happens
    trap 'rm -f "$plain"' EXIT
    mkdir -p "$dir/passwords"
    touch "$passwd"
    : >"$plain"
    for user in "$@"; do
        valid_name "$user" || die "user name '$user': letters, digits, '_', '.', '-' (at most 64)"
        if grep -q "^$user:" "$passwd"; then
            echo "make-secrets: $user is already in $passwd; kept"
            continue
        fi
        openssl rand -hex 24 >"$dir/passwords/$user"
        printf '%s:%s\n' "$user" "$(cat "$dir/passwords/$user")" >>"$plain"
        added=$((added + 1))
    done
    if [ "$added" -gt 0 ]; then
        mosquitto_passwd -U "$plain" >/dev/null
        cat "$plain" >>"$passwd"
    fi
    echo "make-secrets: $added user(s) added to $passwd; their passwords are in $dir/passwords/"
}

[ $# -ge 3 ] || die "usage: make-secrets.sh ca DIR NAME [NAME...] | users DIR USER [USER...]"
command="$1" dir="$2"
shift 2
mkdir -p "$dir"
case "$command" in
    ca)
        command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
        make_ca "$dir"
        make_server_cert "$dir" "$@"
        ;;
    users)
        command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd is not installed (apt-get install mosquitto)"
        command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
        add_users "$dir" "$@"
        ;;
    *) die "unknown command '$command': ca or users" ;;
esac
