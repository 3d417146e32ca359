# kmodforge's build driver: runs with bash in the kernel's toolchain container, with no
# network. /kmodforge/src is the module folder (read-only), /kmodforge/out receives the
# results. KMF_MODE=kbuild builds a module of kmodforge's own: the argv given; KMF_MODE=dkms
# builds a DKMS package as DKMS builds it: dkms.conf read the way DKMS reads it (two
# passes of bash), BUILD_EXCLUSIVE_*, patches, PRE_BUILD, MAKE (MAKE_MATCH, the leading
# `make` rewrite), every listed module checked, STRIP, POST_BUILD, in
# $dkms_tree/<name>/<version>/build with /usr/src/<name>-<version> in place.
#
# Results: /kmodforge/out/modules/<name>.ko (stripped unless told not to), unstripped/,
# Module.symvers, and a manifest (tab-separated lines: "package NAME VERSION" and
# "module FILE BUILT-PATH STRIPPED LOCATION"). Exit 77 with out/skip is a skip (DKMS's
# BUILD_EXCLUSIVE); any other failure writes one line to out/error (what, and where).
# out/phases says where the time went, whatever the outcome: "PHASE EPOCH-SECONDS" when
# the driver started, had copied the sources, had built and had kept the modules, then
# the CPU ticks of the driver and everything it waited for, the clock's ticks per
# second, and how many objects the build compiled (how wide a parallel make can go).
#
# No `set -u` or `pipefail`: package code (dkms.conf, MAKE, PRE_BUILD) runs in the shell
# options DKMS gives it.
out=/kmodforge/out
mkdir -p "$out/modules" "$out/unstripped"
: > "$out/manifest"

phase() { printf '%s\t%s\n' "$1" "$(date +%s.%N)" >> "$out/phases"; }
: > "$out/phases"
phase start
objects_in=""
account() { # at exit: CPU of this shell and the children it waited for (stat fields 14-17)
	local f n=0
	read -r -a f < "/proc/$$/stat" || return 0
	printf 'cpu_ticks\t%s\n' "$((f[13] + f[14] + f[15] + f[16]))" >> "$out/phases"
	printf 'ticks_per_second\t%s\n' "$(getconf CLK_TCK 2> /dev/null || echo 100)" >> "$out/phases"
	if [ -n "$objects_in" ]; then n=$(find "$objects_in" -name '*.o' -type f 2> /dev/null | wc -l); fi
	printf 'objects\t%s\n' "$n" >> "$out/phases"
}
trap account EXIT

fail() { # status message...
	local status=$1; shift
	printf '%s\n' "$*" > "$out/error"
	printf 'kmodforge: %s\n' "$*" >&2
	exit "$status"
}

skip() {
	printf '%s\n' "$*" > "$out/skip"
	printf 'kmodforge: skipped: %s\n' "$*" >&2
	exit 77
}

# keep SRC-PATH FILE-NAME STRIP(yes|no) LOCATION: the module into out/, stripped as asked.
keep() {
	cp "$1" "$out/unstripped/$2" || fail 7 "cannot copy $1"
	cp "$1" "$out/modules/$2"
	if [ "$3" = yes ]; then
		strip -g "$out/modules/$2" || fail 7 "strip -g failed on $2"
	fi
	printf 'module\t%s\t%s\t%s\t%s\n' "$2" "$1" "$3" "$4" >> "$out/manifest"
}

symvers() { # DIR: keep the Module.symvers a build left there
	if [ -f "$1/Module.symvers" ]; then cp "$1/Module.symvers" "$out/Module.symvers"; fi
}

kbuild() {
	local build=/kmodforge/build f
	mkdir -p "$build" && cp -R /kmodforge/src/. "$build/" || fail 1 "cannot copy the module's sources"
	cd "$build" || exit 1
	objects_in=$build
	phase copied
	"$@"
	local status=$?
	phase built
	[ "$status" -eq 0 ] || fail 10 "the build command failed with exit status: $status"
	if [ -n "${KMF_BUILT:-}" ]; then
		while IFS= read -r f; do
			[ -n "$f" ] || continue
			if [ -f "$f" ]; then keep "$f" "$(basename "$f")" "$KMF_STRIP" ""
			else printf 'missing\t%s\n' "$f" >> "$out/manifest"; fi
		done <<< "$KMF_BUILT"
	else
		while IFS= read -r f; do
			keep "${f#./}" "$(basename "$f")" "$KMF_STRIP" ""
		done < <(find . -name '*.ko' -type f | LC_ALL=C sort)
	fi
	symvers "$build"
	phase kept
}

# The directives DKMS knows; anything else a dkms.conf sets does not survive the read.
directives=(CLEAN PACKAGE_NAME PACKAGE_VERSION POST_ADD POST_BUILD POST_INSTALL POST_REMOVE
	PRE_BUILD PRE_INSTALL BUILD_DEPENDS BUILD_DEPENDS_REBUILD BUILD_EXCLUSIVE_KERNEL
	BUILD_EXCLUSIVE_KERNEL_MIN BUILD_EXCLUSIVE_KERNEL_MAX BUILD_EXCLUSIVE_ARCH
	BUILD_EXCLUSIVE_CONFIG OBSOLETE_BY MAKE MAKE_MATCH PATCH PATCH_MATCH BUILT_MODULE_NAME
	BUILT_MODULE_LOCATION DEST_MODULE_NAME DEST_MODULE_LOCATION STRIP AUTOINSTALL
	NO_WEAK_MODULES REMAKE_INITRD MODULES_CONF MODULES_CONF_OBSOLETES
	MODULES_CONF_ALIAS_TYPE MODULES_CONF_OBSOLETE_ONLY)

# read_conf FILE: DKMS's two passes. Pass 1 sources the file in a subshell (its output
# dropped) and prints every directive as NAME[i]="value"; pass 2 sources that printout,
# so values are expanded a second time and helper variables do not leak. A trailing \r
# is dropped (CRLF files work).
read_conf() {
	local conf=$1 printed
	printed=$(mktemp)
	(
		unset "${directives[@]}"
		# shellcheck disable=SC1090
		. "$conf" > /dev/null
		for v in "${directives[@]}"; do
			eval "idx=(\"\${!$v[@]}\")"
			for i in "${idx[@]}"; do
				eval "val=\${$v[$i]}"
				printf '%s[%s]="%s"\n' "$v" "$i" "${val%$'\r'}"
			done
		done
	) > "$printed"
	unset "${directives[@]}"
	# shellcheck disable=SC1090
	. "$printed"
	rm -f "$printed"
}

version_le() { # A B: A <= B as versions
	[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$1" ]
}

# Why this kernel is excluded, if it is (DKMS exits 77 for it).
excluded() {
	local word name kver_num=${kernelver%%-*}
	if [ -n "${BUILD_EXCLUSIVE_KERNEL:-}" ] && ! [[ $kernelver =~ $BUILD_EXCLUSIVE_KERNEL ]]; then
		echo "BUILD_EXCLUSIVE_KERNEL=\"$BUILD_EXCLUSIVE_KERNEL\" does not match kernel $kernelver"; return
	fi
	if [ -n "${BUILD_EXCLUSIVE_KERNEL_MIN:-}" ] && ! version_le "$BUILD_EXCLUSIVE_KERNEL_MIN" "$kver_num"; then
		echo "kernel $kernelver is older than BUILD_EXCLUSIVE_KERNEL_MIN=\"$BUILD_EXCLUSIVE_KERNEL_MIN\""; return
	fi
	if [ -n "${BUILD_EXCLUSIVE_KERNEL_MAX:-}" ] && ! version_le "$kver_num" "$BUILD_EXCLUSIVE_KERNEL_MAX"; then
		echo "kernel $kernelver is newer than BUILD_EXCLUSIVE_KERNEL_MAX=\"$BUILD_EXCLUSIVE_KERNEL_MAX\""; return
	fi
	if [ -n "${BUILD_EXCLUSIVE_ARCH:-}" ] && ! [[ $arch =~ $BUILD_EXCLUSIVE_ARCH ]]; then
		echo "BUILD_EXCLUSIVE_ARCH=\"$BUILD_EXCLUSIVE_ARCH\" does not match architecture $arch"; return
	fi
	if [ -n "${BUILD_EXCLUSIVE_CONFIG:-}" ] && [ -f "$kernel_source_dir/.config" ]; then
		for word in $BUILD_EXCLUSIVE_CONFIG; do
			name=${word#!}
			if [ "$word" != "$name" ]; then
				if grep -q -E "^$name=[ym]" "$kernel_source_dir/.config"; then
					echo "BUILD_EXCLUSIVE_CONFIG: kernel $kernelver has $name set"; return
				fi
			elif ! grep -q -E "^$name=[ym]" "$kernel_source_dir/.config"; then
				echo "BUILD_EXCLUSIVE_CONFIG: kernel $kernelver does not have $name"; return
			fi
		done
	fi
}

# check_conf: what DKMS checks after reading (exit 8 "Bad conf file"), with 3.2's
# counting (the highest index of the four module arrays, plus one).
check_conf() {
	local i n=0 j
	[ -n "${PACKAGE_NAME:-}" ] || fail 8 "dkms.conf sets no PACKAGE_NAME"
	[ -n "${PACKAGE_VERSION:-}" ] || fail 8 "dkms.conf sets no PACKAGE_VERSION"
	for v in BUILT_MODULE_NAME BUILT_MODULE_LOCATION DEST_MODULE_NAME DEST_MODULE_LOCATION; do
		eval "idx=(\"\${!$v[@]}\")"
		for j in "${idx[@]}"; do [ $((j + 1)) -gt "$n" ] && n=$((j + 1)); done
	done
	[ "$n" -gt 0 ] || fail 8 "dkms.conf lists no module (no BUILT_MODULE_NAME or DEST_MODULE_LOCATION)"
	count=$n
	for ((i = 0; i < n; i++)); do
		built_name[i]=${BUILT_MODULE_NAME[i]:-}
		if [ -z "${built_name[i]}" ] && [ "$n" -eq 1 ]; then built_name[i]=$PACKAGE_NAME; fi
		[ -n "${built_name[i]}" ] || fail 8 "dkms.conf: BUILT_MODULE_NAME[$i] is not set"
		dest_name[i]=${DEST_MODULE_NAME[i]:-${built_name[i]}}
		for name in "${built_name[i]}" "${dest_name[i]}"; do
			case $name in *.o | *.ko) fail 8 "dkms.conf: module name $name must not end in .o or .ko" ;; esac
		done
		location=${BUILT_MODULE_LOCATION[i]:-}
		built_location[i]=${location:+${location%/}/}
		dest=${DEST_MODULE_LOCATION[i]:-}
		[ -n "$dest" ] || fail 8 "dkms.conf: DEST_MODULE_LOCATION[$i] is not set"
		case $dest in /kernel* | /updates* | /extra*) ;; *) fail 8 "dkms.conf: DEST_MODULE_LOCATION[$i]=\"$dest\" must begin with /kernel, /updates or /extra" ;; esac
		case ${STRIP[i]:-} in [nN]*) strip_it[i]=no ;; [yY]*) strip_it[i]=yes ;;
			"") case ${STRIP[0]:-yes} in [nN]*) strip_it[i]=no ;; *) strip_it[i]=yes ;; esac ;;
			*) strip_it[i]=yes ;; esac
	done
	for i in "${!PATCH[@]}"; do
		case ${PATCH[i]} in /* | ../* | */../* | .. | */..) fail 5 "dkms.conf: PATCH[$i]=\"${PATCH[i]}\" leaves the package's patches/ folder" ;; esac
	done
}

# The MAKE command for this kernel: the last MAKE[i] whose MAKE_MATCH[i] matches (MAKE[0]
# when MAKE_MATCH[0] is empty), else DKMS's default; a leading `make` gets the jobs and
# KERNELRELEASE.
make_command() {
	local i cmd=""
	[ -n "${MAKE_MATCH[0]:-}" ] || cmd=${MAKE[0]:-}
	for i in "${!MAKE[@]}"; do
		if [ -n "${MAKE[i]}" ] && [ -n "${MAKE_MATCH[i]:-}" ] && [[ $kernelver =~ ${MAKE_MATCH[i]} ]]; then
			cmd=${MAKE[i]}
		fi
	done
	[ -n "$cmd" ] || cmd="make -C $kernel_source_dir M=$dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build"
	echo "${cmd/#make/make${KMF_MAKE_JOBS:+ $KMF_MAKE_JOBS} KERNELRELEASE=$kernelver}"
}

# run_script WHAT VALUE: PRE_BUILD or POST_BUILD, a path relative to the build dir with
# its arguments, run there; a failure fails the build (as DKMS 3.1.5+ does).
run_script() {
	local what=$1 script=$2 status
	echo "kmodforge: running $what: $script"
	( cd "$build" && eval "$build/$script" )
	status=$?
	[ "$status" -eq 0 ] || fail 10 "$what \"$script\" failed with exit status: $status"
}

dkms() {
	export kernelver kernel_source_dir arch dkms_tree=/var/lib/dkms source_tree=/usr/src install_tree=/lib/modules
	arch=$(uname -m)
	kernel_config=$kernel_source_dir/.config
	local conf=/kmodforge/src/dkms.conf crlf=""
	if grep -q $'\r' "$conf"; then
		crlf=$(mktemp) && tr -d '\r' < "$conf" > "$crlf" && conf=$crlf
	fi
	bash -n "$conf" 2> /tmp/kmodforge-syntax || fail 8 "dkms.conf is not valid bash: $(head -n1 /tmp/kmodforge-syntax)"
	# The first read finds the package's name and version (as `dkms add` does); the
	# second, the one the build uses, reads it where DKMS does.
	module="" module_version=""
	cd /kmodforge/src || exit 1
	read_conf "$conf"
	[ -n "${PACKAGE_NAME:-}" ] || fail 8 "dkms.conf sets no PACKAGE_NAME"
	[ -n "${PACKAGE_VERSION:-}" ] || fail 8 "dkms.conf sets no PACKAGE_VERSION"
	module=$PACKAGE_NAME module_version=$PACKAGE_VERSION
	build=$dkms_tree/$module/$module_version/build
	# /usr/src/<name>-<version> is the package's own copy, writable as on a DKMS host.
	mkdir -p "$source_tree" "$(dirname "$build")"
	cp -a /kmodforge/src "$source_tree/$module-$module_version" || fail 1 "cannot copy the package's sources"
	ln -sfn "$source_tree/$module-$module_version" "$dkms_tree/$module/$module_version/source"
	read_conf "${crlf:-$dkms_tree/$module/$module_version/source/dkms.conf}"
	check_conf
	printf 'package\t%s\t%s\n' "$PACKAGE_NAME" "$PACKAGE_VERSION" >> "$out/manifest"
	local why
	why=$(excluded)
	[ -z "$why" ] || skip "$why"
	[ -d "$kernel_source_dir/include" ] || fail 1 "no kernel headers at $kernel_source_dir"

	mkdir -p "$build" && cp -a /kmodforge/src/. "$build/" || fail 1 "cannot copy the package's sources"
	cd "$build" || exit 1
	objects_in=$build
	phase copied

	local i p
	for i in "${!PATCH[@]}"; do
		p=${PATCH[i]}
		[ -n "$p" ] || continue
		if [ -n "${PATCH_MATCH[i]:-}" ] && ! [[ $kernelver =~ ${PATCH_MATCH[i]} ]]; then continue; fi
		[ -f "patches/$p" ] || fail 5 "dkms.conf: PATCH[$i] names patches/$p, which is not in the package"
		command -v patch > /dev/null || fail 5 "the toolchain has no patch program (Debian package patch)"
		echo "kmodforge: applying patches/$p"
		patch -p1 < "patches/$p" || fail 6 "patches/$p does not apply (PATCH[$i])"
	done
	local cc
	cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([^ "]*\).*/\1/p' "$kernel_source_dir/.config" 2> /dev/null)
	if [ -n "$cc" ] && command -v "$cc" > /dev/null; then export CC=$cc; fi
	[ -z "${PRE_BUILD:-}" ] || run_script PRE_BUILD "$PRE_BUILD"

	# CLEAN runs first, output and status ignored, as bookworm's DKMS 3.0 does.
	local clean=${CLEAN:-make -C $kernel_source_dir M=$build clean}
	( eval "$clean" ) > /dev/null 2>&1

	local cmd status
	cmd=$(make_command)
	echo "kmodforge: $cmd"
	( eval "$cmd" )
	status=$?
	phase built
	[ "$status" -eq 0 ] || fail 10 "MAKE failed with exit status: $status: $cmd"
	for ((i = 0; i < count; i++)); do
		f=${built_location[i]}${built_name[i]}.ko
		[ -f "$f" ] || fail 7 "the build did not make $f, which dkms.conf lists (BUILT_MODULE_NAME[$i]${BUILT_MODULE_LOCATION[i]:+, BUILT_MODULE_LOCATION[$i]})"
	done
	for ((i = 0; i < count; i++)); do
		keep "${built_location[i]}${built_name[i]}.ko" "${dest_name[i]}.ko" "${strip_it[i]}" "updates/dkms"
	done
	symvers "$build"
	# Where DKMS has stored the modules when POST_BUILD runs.
	local stored=$dkms_tree/$module/$module_version/$kernelver/$arch
	mkdir -p "$stored/module" "$stored/log" && cp "$out"/modules/*.ko "$stored/module/"
	[ -z "${POST_BUILD:-}" ] || run_script POST_BUILD "$POST_BUILD"
	phase kept
}

case ${KMF_MODE:-} in
	kbuild) kbuild "$@" ;;
	dkms) dkms ;;
	*) fail 1 "KMF_MODE must be kbuild or dkms" ;;
esac
