#!/bin/bash
# Build the two local test images and push them to the registry on 127.0.0.1:5000.
# Each image is skipped when the registry already has it; built OCI layouts stay in
# $STACYVM_CACHE/oci so a wiped registry is refilled by a push, not a rebuild.
set -euo pipefail

REGISTRY=127.0.0.1:5000
CACHE="${STACYVM_CACHE:-/var/cache/stacyvm}"
OCI="$CACHE/oci"
ACCEPT="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"

log() { echo "build-test-images: $*"; }

. "$(dirname "$0")/lib-apt.sh"
need_pkgs umoci skopeo mmdebstrap

in_registry() { # repo tag
    curl -fsS -m 5 -o /dev/null -I -H "Accept: $ACCEPT" "http://$REGISTRY/v2/$1/manifests/$2" 2>/dev/null
}

in_layout() { # layout tag
    [ -f "$1/index.json" ] && umoci ls --layout "$1" 2>/dev/null | grep -qx "$2"
}

# Turn a rootfs directory into a one-layer OCI image in layout $1 with tag $2.
make_layout() { # layout tag rootfs cmd...
    local layout=$1 tag=$2 rootfs=$3
    shift 3
    local tmp="$layout.tmp"
    rm -rf "$tmp"
    umoci init --layout "$tmp"
    umoci new --image "$tmp:$tag"
    umoci insert --image "$tmp:$tag" "$rootfs" /
    local cmdargs=()
    for c in "$@"; do cmdargs+=(--config.cmd "$c"); done
    umoci config --image "$tmp:$tag" --os linux --architecture amd64 \
        --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --config.workingdir / "${cmdargs[@]}"
    umoci gc --layout "$tmp"
    rm -rf "$layout"
    mv "$tmp" "$layout"  # only a finished layout gets the final name
}

build_busybox() { # rootfs
    local r=$1
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev}
    chmod 1777 "$r/tmp"
    chmod 700 "$r/root"
    cp /bin/busybox "$r/bin/busybox"
    local applet
    while read -r applet; do
        [ "$applet" = "bin/busybox" ] || [ -e "$r/$applet" ] || ln -s /bin/busybox "$r/$applet"
    done < <(/bin/busybox --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
}

build_debian_python() { # rootfs
    # The mirror is whatever this machine's apt uses: pass its Debian source files verbatim.
    local mirrors=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -qE '^[^#]*(URIs:|deb ).*/debian' "$f" && mirrors+=("$f")
    done
    [ ${#mirrors[@]} -gt 0 ] || { echo "no Debian apt source found in /etc/apt" >&2; exit 1; }
    log "mmdebstrap bookworm (sources: ${mirrors[*]})"
    mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates bookworm "$1" "${mirrors[@]}"
}

image() { # name tag builder cmd...
    local name=$1 tag=$2 builder=$3
    shift 3
    local repo="stacyvm/$name" layout="$OCI/$name"
    if in_registry "$repo" "$tag"; then
        log "$REGISTRY/$repo:$tag already in the registry, skipped"
        return
    fi
    if in_layout "$layout" "$tag"; then
        log "$name:$tag: using cached OCI layout $layout"
    else
        local t0=$SECONDS work
        work=$(mktemp -d "$CACHE/build.XXXXXX")
        log "$name:$tag: building rootfs in $work"
        "$builder" "$work/rootfs"
        log "$name:$tag: making OCI layout $layout"
        make_layout "$layout" "$tag" "$work/rootfs" "$@"
        rm -rf "$work"
        log "$name:$tag: built in $((SECONDS - t0)) s"
    fi
    log "pushing $REGISTRY/$repo:$tag"
    skopeo copy --quiet --dest-tls-verify=false "oci:$layout:$tag" "docker://$REGISTRY/$repo:$tag"
}

mkdir -p "$OCI"
curl -fsS -m 2 -o /dev/null "http://$REGISTRY/v2/" || { echo "no registry on $REGISTRY; run scripts/start-registry.sh" >&2; exit 1; }
image busybox 1.35 build_busybox /bin/sh
image debian-python 3.11 build_debian_python /usr/bin/python3
log "done"
