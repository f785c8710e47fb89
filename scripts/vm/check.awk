# Checks a `ferry spool export` of the power-cut stream (one JSON object per line, oldest
# first) whose records are the lines "line NNNNNNNNN ..." of the input file.
# Variables: R = highest seq the last status before the cut reported; PHASE = pre (right after
# the cut: seqs are written to PRE) or final (after the resume: PRE is read alongside to find
# seqs at or below R that were missing after the cut and were handed out again).
# Prints one `RESULT` line.
BEGIN {
    n = 0; le = 0; mism = 0; dup = 0; prev = 0; maxs = 0; mins = -1; bad = 0
    reused = 0; inexact = 0; firstbad = "-"
    if (PHASE == "final") more = ((getline p < PRE) > 0)
}
{
    if (!match($0, /"seq":[0-9]+/)) { bad++; next }
    s = substr($0, RSTART + 6, RLENGTH - 6) + 0
    l = -1
    if (match($0, /"line":"line [0-9]+/)) l = substr($0, RSTART + 13, RLENGTH - 13) + 0
    n++
    if (s <= prev) dup++
    prev = s
    if (mins < 0 || s < mins) mins = s
    if (s > maxs) maxs = s
    if (l != s) mism++
    if (s <= R) le++
    if (PHASE == "pre") {
        print s > PRE
    } else {
        while (more && p + 0 < s) more = ((getline p < PRE) > 0)
        if (s <= R && !(more && p + 0 == s)) reused++
        if (s != n || l != n) { inexact++; if (firstbad == "-") firstbad = n ":" s ":" l }
    }
}
END {
    out = "RESULT " PHASE "_count=" n " " PHASE "_le_reported=" le " " PHASE "_min=" sprintf("%.0f", mins < 0 ? 0 : mins) \
        " " PHASE "_max=" sprintf("%.0f", maxs) " " PHASE "_line_ne_seq=" mism " " PHASE "_not_increasing=" dup \
        " " PHASE "_unparsed=" bad
    if (PHASE == "final") out = out " final_reused=" reused " final_inexact=" inexact " final_first_bad=" firstbad
    print out
}
