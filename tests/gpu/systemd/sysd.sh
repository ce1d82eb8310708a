#!/bin/bash
# Device side: systemd 252 (Debian 12's packages) as PID 1 of a new PID + mount namespace, on a GPU
# machine that has no systemd of its own. Once per machine; a second call only reports the running one.
#
#   bash tests/gpu/systemd/sysd.sh DEBS_DIR      # DEBS_DIR: the .debs tests/gpu/make_kit.sh downloaded
#   nsx systemctl status vllm                    # every systemd command runs inside, through nsx
#
# Facts this depends on (measured on the lent H200 machine, docs/gpu-validation.md):
# - only files the image lacks are copied in: its own libraries are never overwritten;
# - systemd-tmpfiles empties /tmp when this systemd boots (Debian's tmp.conf, masked below), so state lives
#   under /srv/vf-systemd anyway;
# - PIDs systemd reports (MainPID) are PIDs of the namespace: kill/ps them through nsx.
set -u
DEBS=${1:?usage: sysd.sh DEBS_DIR}
ST=/srv/vf-systemd
mkdir -p "$ST"
cat > /usr/local/bin/nsx <<EOS
#!/bin/bash
exec nsenter -t \$(cat $ST/sysd.pid) -m -p -- "\$@"
EOS
chmod 755 /usr/local/bin/nsx
if [ -f "$ST/sysd.pid" ] && kill -0 "$(cat "$ST/sysd.pid")" 2>/dev/null; then
  echo "systemd already up: pid $(cat "$ST/sysd.pid")"; exit 0
fi
mkdir -p "$ST/debroot"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$ST/debroot"; done
n=0
while IFS= read -r f; do
  f=${f#./}
  if [ ! -e "/$f" ] && [ ! -L "/$f" ]; then mkdir -p "/$(dirname "$f")"; cp -a "$ST/debroot/$f" "/$f"; n=$((n+1)); fi
done < <(cd "$ST/debroot" && find . \( -type f -o -type l \))
ldconfig
echo "copied $n files from $(ls "$DEBS"/*.deb | wc -l) packages"
missing=$(ldd /lib/systemd/systemd | grep -c "not found")
[ "$missing" = 0 ] || { ldd /lib/systemd/systemd | grep "not found"; exit 1; }
[ -s /etc/machine-id ] || systemd-machine-id-setup >/dev/null 2>&1 || dbus-uuidgen > /etc/machine-id
# Debian's tmpfiles.d/tmp.conf ("D /tmp") empties /tmp when this systemd boots, under the feet of whatever
# the device call keeps there (its $OUT, the repo copy): masked, the rest of tmpfiles still runs.
mkdir -p /etc/tmpfiles.d; [ -e /etc/tmpfiles.d/tmp.conf ] || ln -s /dev/null /etc/tmpfiles.d/tmp.conf
setsid unshare --fork --pid --mount --mount-proc --propagation private \
  env container=vllm-fleet-gpu /lib/systemd/systemd --system --log-level=info > "$ST/sysd.log" 2>&1 < /dev/null &
UPID=$!
SPID=
for _ in $(seq 50); do SPID=$(pgrep -P "$UPID" | head -1); [ -n "$SPID" ] && break; sleep 0.2; done
[ -n "$SPID" ] || { echo "systemd did not start"; cat "$ST/sysd.log"; exit 1; }
echo "$SPID" > "$ST/sysd.pid"
timeout 60 nsx systemctl is-system-running --wait; echo "is-system-running rc=$? (degraded is fine: units the image cannot run)"
nsx systemctl --version | head -1
