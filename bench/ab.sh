#!/usr/bin/env bash
# Before/after figures of two streamgate binaries, for a commit message: the scenarios run
# against streamgate only, interleaved (before, after, before, after, before, after), then a
# table of the medians and spreads of the streamgate figures per scenario.
#
#   bench/ab.sh BEFORE_BIN AFTER_BIN [scenario...] [--quick ...]
#
# Scenarios default to `h1 h2 sse-h1 sse-h2 fleet` (about 3 minutes in all); arguments that
# start with -- go to the bench. AB_RUNS=N changes the runs per side (3). Needs
# target/release/streamgate-bench built, and wrk and h2load installed (bench/run.sh does both).
# Spread = (max - min) / median; change = after median / before median - 1, marked better or
# worse only when the two sides' ranges (min to max) do not overlap.
set -euo pipefail

if (($# < 2)); then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
before=$(realpath "$1")
after=$(realpath "$2")
shift 2
cd "$(dirname "$0")/.."
scen=() flags=()
for a in "$@"; do
    if [[ $a == --* ]]; then flags+=("$a"); else scen+=("$a"); fi
done
((${#scen[@]})) || scen=(h1 h2 sse-h1 sse-h2 fleet)
runs=${AB_RUNS:-3}
out=$(mktemp -d /tmp/streamgate-ab.XXXXXX)
ulimit -n "$(ulimit -Hn)"

for i in $(seq "$runs"); do
    for side in before after; do
        bin=$before
        [[ $side == after ]] && bin=$after
        echo "ab: run $i of $runs, $side: $bin" >&2
        if ! taskset -c 1 target/release/streamgate-bench scenario "${scen[@]}" \
            --gateway "$bin" --targets streamgate --rounds 1 --results "$out" \
            --tsv "$out/$side-$i.tsv" ${flags[@]+"${flags[@]}"} \
            >"$out/$side-$i.md" 2>"$out/$side-$i.log"; then
            tail -20 "$out/$side-$i.log" >&2
            echo "ab: the $side run $i failed; its output is in $out" >&2
            exit 1
        fi
        grep -h "note: .*failed" "$out/$side-$i.log" >&2 || true
    done
done

echo "streamgate A/B, $runs runs each, interleaved; ${scen[*]} ${flags[*]-}"
echo "before: $before"
echo "after:  $after"
echo
awk -F'\t' '
function fmt(v, a) {
    a = v < 0 ? -v : v
    if (a >= 100) return sprintf("%.0f", v)
    if (a >= 10) return sprintf("%.1f", v)
    if (a >= 1) return sprintf("%.2f", v)
    return sprintf("%.3f", v)
}
# Sorts vals[1..n] in place (a handful of values); returns the median.
function median(n, i, j, t) {
    for (i = 2; i <= n; i++)
        for (j = i; j > 1 && vals[j - 1] > vals[j]; j--) {
            t = vals[j]; vals[j] = vals[j - 1]; vals[j - 1] = t
        }
    return n % 2 ? vals[(n + 1) / 2] : (vals[n / 2] + vals[n / 2 + 1]) / 2
}
function stats(side, k, n, i, m) {
    n = cnt[side, k]
    if (n == 0) { med[side] = ""; return "n/a | " }
    for (i = 1; i <= n; i++) vals[i] = v[side, k, i]
    m = median(n)
    med[side] = m
    lo[side] = vals[1]
    hi[side] = vals[n]
    return fmt(m) " | " (m != 0 ? sprintf("%.1f %%", (vals[n] - vals[1]) / (m < 0 ? -m : m) * 100) : "–")
}
FNR == 1 { side = FILENAME; sub(/.*\//, "", side); sub(/-.*/, "", side) }
$4 != "" {
    k = $1 "\t" $2
    if (!(k in seen)) { seen[k] = 1; order[++nk] = k; better[k] = $3 }
    v[side, k, ++cnt[side, k]] = $4
}
END {
    print "| scenario | metric | before median | spread | after median | spread | change |"
    print "|---|---|--:|--:|--:|--:|--:|"
    for (i = 1; i <= nk; i++) {
        k = order[i]
        split(k, sm, "\t")
        b = stats("before", k); a = stats("after", k)
        ch = "–"
        if (med["before"] != "" && med["after"] != "" && med["before"] != 0) {
            d = (med["after"] / med["before"] - 1) * 100
            ch = sprintf("%+.1f %%", d)
            if (better[k] != "info") {
                if (lo["after"] <= hi["before"] && lo["before"] <= hi["after"]) ch = ch " (ranges overlap)"
                else if (better[k] == "higher" && d > 0 || better[k] == "lower" && d < 0) ch = ch " (better)"
                else ch = ch " (worse)"
            }
        }
        print "| " (sm[1] == last ? "" : sm[1]) " | " sm[2] " | " b " | " a " | " ch " |"
        last = sm[1]
    }
}' "$out"/before-*.tsv "$out"/after-*.tsv
echo
echo "(runs kept in $out)"
