#!/usr/bin/env bash
# The measurement queue on the released base (055ce44a), one torch job at a time, in the order the selection
# rules need them (development choices first, then the held-out families, then what reads their adapters).
# Every unit is resumable (bench/redteam.py appends a row per finished unit and skips it next time; adapters and
# checkpoints stay in the data dir), and a unit that finished is marked in $DONE, so re-running this script after
# an interruption continues where it stopped.
#
#   bash lab/bench_queue.sh [CONFIG]      # run from the repository root; log to a file of your choice
#
# On a new machine (the data dir and its markers gone) touch the markers of the units whose results are committed
# first; the red-team units skip finished rows by themselves, the other benches would run again.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${1:-}
DONE=${DONE:-${SAFETY_GUARD_HOME:-$HOME/.cache/safety-guard}/work/bench-queue}
mkdir -p "$DONE"
C=(); [ -n "$CONFIG" ] && C=(--config "$CONFIG")
run() {
  local name=$1; shift
  if [ -f "$DONE/$name" ]; then echo "skip $name (done)"; return; fi
  echo "=== $(date +%T) $name: $*"
  if "$@"; then touch "$DONE/$name"; echo "=== $(date +%T) $name done"; else echo "=== $(date +%T) $name FAILED ($?)"; fi
}
# development (choices)
run align_eval      $PY bench/align_eval.py "${C[@]}"
run dev_e2          $PY bench/redteam.py --dev --families dev_diverse --methods sft,sbr_pool4_screen10@30,sbr_pool4e2_screen10@30 "${C[@]}"
run train_overhead  $PY bench/train_overhead.py "${C[@]}"
run dev_scorer      $PY bench/redteam.py --dev --families dev_scorer --methods sft "${C[@]}"
run dev_more1       $PY bench/redteam.py --dev --families dev_diverse --methods sbr,sft_screen "${C[@]}"
run dev_more2       $PY bench/redteam.py --dev --families dev_harmful_only --methods sft "${C[@]}"
run probe_positions $PY bench/probe_positions.py "${C[@]}"
run gauge_dev       $PY bench/gauge.py --dev "${C[@]}"
run cond_dev        $PY bench/lock_conditional.py dev "${C[@]}"
run serve_cond      $PY bench/serve_overhead.py --compiled --conditional --requests 48 --reps 6
run dev_asft        $PY bench/redteam.py --dev --families dev_diverse --methods asft,asft@10,asft@100 "${C[@]}"
# the framing-robust gate (bench/lock_gate_dev.py rule v6; development models only) before anything that reads
# the gate (screening, the conditional lock): the queue stops after it until its outcome is adopted in code, or
# not, and marked decided (decided 2026-12-03: adopted, gate data v6)
run gate_dev6       $PY bench/lock_gate_dev.py --rule v6 "${C[@]}"
if [ ! -f "$DONE/gate_decided" ]; then
  echo "=== $(date +%T) stop: read bench/results/lock_gate_dev_v6.json, adopt its outcome (or not), then touch $DONE/gate_decided"
  exit 0
fi
# the held-out framing attack on the adopted gate (scoring only; the v5 gate's row is in git history)
run gate_framing6   $PY bench/gate_framing.py "${C[@]}"
# the two rules re-run on the v6 gate in session 22 from a tree with the adoption not yet committed: again from a
# clean one (the same deterministic scoring; the results must not change, and the commit stamp is then clean)
run screen_dev6     $PY bench/screen_dev.py "${C[@]}"
run cond_dev6       $PY bench/lock_conditional.py dev "${C[@]}"
# held-out (reports)
run rt_sft          $PY bench/redteam.py --families diverse,stress,high_lr,rank1,harmful_only --methods sft "${C[@]}"
# the shipped SBR recipe with screening re-chosen for the v6 gate (max fpr 0.20), on the development family first:
# a check that chooses nothing (its earlier dev row screened with the v5 gate at 0.10)
run dev_e3          $PY bench/redteam.py --dev --families dev_diverse --methods sbr_pool4_screen20@30 "${C[@]}"
run rt_sbr          $PY bench/redteam.py --families diverse,stress,high_lr,rank1,harmful_only --methods sbr_pool4_screen20@30 "${C[@]}"
# the conditional lock as soon as 3+ held-out SFT adapters and the SBR one exist (resumable per adapter)
run cond_eval       $PY bench/lock_conditional.py eval "${C[@]}"
# serving overhead of the shipped conditional lock again (serve_cond measured the v5 gate at layer 15 with fallback)
run serve_cond6     $PY bench/serve_overhead.py --compiled --conditional --requests 48 --reps 6
# the held-out high_lr family's FA miss, on development families only (docs/hardening.md, the hardening rule's
# seventh amendment): the queue stops after it until the rule's outcome is adopted in code, or not, and marked
# decided (touch $DONE/keep_decided); what follows trains the shipped SBR recipe
run dev_high_lr     $PY bench/redteam.py --dev --families dev_high_lr --methods sft,sft_screen20,sbr_pool4_screen20@30,sbr_pool4_screen20_keep@30 "${C[@]}"
run dev_keep        $PY bench/redteam.py --dev --families dev_diverse --methods sbr_pool4_screen20_keep@30 "${C[@]}"
if [ ! -f "$DONE/keep_decided" ]; then
  echo "=== $(date +%T) stop: read the dev_high_lr / dev_diverse rows (bench/results/redteam_dev.jsonl), apply the seventh amendment's rule, then touch $DONE/keep_decided"
  exit 0
fi
# adopted 2026-12-04 (harden.screen_keep_steps on; the shipped label is sbr_pool4_screen20_keep@30): the held-out
# families' SBR column again with the shipped recipe, first (the hardening issue's acceptance reads it)
run rt_sbr_keep     $PY bench/redteam.py --families diverse,stress,high_lr,rank1,harmful_only --methods sbr_pool4_screen20_keep@30 "${C[@]}"
# the conditional lock's fifth amendment (docs/safetylock.md: the gate reading the adapter's or the base's states)
# on the four development SFT adapters
run cond_dev5       $PY bench/lock_conditional.py dev "${C[@]}"
# what reads lock.gate_reads waits until the fifth amendment's outcome is adopted in code, or not (decided
# 2026-12-04: adopted, gate_reads base; the held-out cond_eval with it ran by hand the same day)
if [ ! -f "$DONE/reads_decided" ]; then
  echo "=== $(date +%T) stop: read bench/results/lock_conditional_dev.json (the fifth amendment's choice), adopt it (or not), then touch $DONE/reads_decided"
  exit 0
fi
# (re-ordered 2026-12-04: the adaptive attackers and the gauge first, the long and AsFT columns after; the gauge
# reads the rows the red-team bench wrote, so gauge_all repeats it over every adapter at the end)
run rt_adaptive     $PY bench/redteam.py --families probe_dodge,gate_dodge --methods sft,sbr_pool4_screen20_keep@30 "${C[@]}"
run rt_attacker_sbr $PY bench/redteam.py --families diverse --methods sbr_pool@30 "${C[@]}"
run gauge           $PY bench/gauge.py "${C[@]}"
# (re-ordered 2026-12-04, session 26: the eighth amendment first — what it adopts decides the recipe the
# 20-epoch family's SBR column trains — then what does not depend on it: the 20-epoch family's SFT, the AsFT
# column, the probe's duty cycle; the queue stops there until the outcome is adopted in code, or not)
# the held-out gate_dodge miss, on a development family only (docs/hardening.md, the hardening rule's eighth
# amendment): the dodge family's four rows, then each candidate the rule names on the two guard families
# (ninth amendment, after the shipped recipe's dev row: the screen dropped 99 of 100 dev framed examples, so the
# screened candidates could not be told apart; the regularizers are compared with screening off instead)
run dev_gate_dodge  $PY bench/redteam.py --dev --families dev_gate_dodge --methods sft,sbr_pool4_screen20_keep@30,sbr_pool4@30,sbr_poolf4@30,sbr_pool4@100 "${C[@]}"
gate_dodge_rule() {
  $PY -c 'import json, sys; from lab.redteam import gate_dodge_rule as r; o = r(json.load(open("bench/results/redteam_dev.json"))); print((o or {}).get(sys.argv[1]) or "")' "$1"
}
for _ in 1 2; do
  cand=$(gate_dodge_rule try)
  [ -n "$cand" ] && run "dev_gate_guard_$cand" $PY bench/redteam.py --dev --families dev_diverse,dev_high_lr --methods "$cand" "${C[@]}"
done
echo "=== $(date +%T) eighth amendment: adopt '$(gate_dodge_rule adopt)' (empty: the shipped recipe stays)"
# the operator's private probe set over the adapters so far (the gauge issue; cheap: no training)
run gauge_private   $PY bench/gauge.py --private-probes "${C[@]}"
# the attacker who beats both shipped probe signals (refuses the shipped probes and pins their states with SBR):
# what a private probe set is for
run rt_gauge_dodge  $PY bench/redteam.py --families probe_dodge --methods sbr_probes@30 "${C[@]}"
# (re-ordered 2026-12-04, session 27, on a new machine with the data dir gone: the 20-epoch family's two columns
# first — the hardening issue's acceptance reads them — then what reads their adapters, then the AsFT column)
SHIPPED=sbr_pool4_screen20_keep@30  # lab.redteam.CHOSEN_SBR (the eighth amendment kept it: gate_dodge_decided)
run rt_long         $PY bench/redteam.py --families long --methods "sft,$SHIPPED" "${C[@]}"
run gauge2          $PY bench/gauge.py "${C[@]}"  # seconds: the bench took the numbers while training
run gauge_private2  $PY bench/gauge.py --private-probes "${C[@]}"  # only the new adapters (earlier ones read from gauge_private.json)
# the AsFT column at the paper's λ (the hardening issue's last column; resumable per family)
run rt_asft1        $PY bench/redteam.py --families diverse,stress,high_lr,rank1,harmful_only,long --methods asft "${C[@]}"
# (re-ordered 2026-12-04, session 28: the alignment issue's rule v4 first — it is what is still open — then the
# report that chooses nothing)
# the alignment recipe's rule v4 (lab/align_dev.py: two seeds per variant, the 15-minute budget on this kind of
# machine); what it adopts would be a new base, on which every row is measured again
run align_dev4      $PY -m lab.align_dev --rule 4 --out bench/results/align_dev.jsonl "${C[@]}"
# rule v5 (lab/align_dev.py: the base's release merged at seven delta scales; minutes, no training): the queue
# stops after it until its outcome is adopted in code (align.delta_scale), or not, and marked decided
run align_dev5      $PY -m lab.align_dev --rule 5 --out bench/results/align_dev.jsonl "${C[@]}"
if [ ! -f "$DONE/scale_decided" ]; then
  echo "=== $(date +%T) stop: read rule v5's choice (the last line of align_dev5's log), set align.delta_scale (or not), then touch $DONE/scale_decided"
  exit 0
fi
# the 20-epoch attack reaching SBR: the shipped regularizer with screening off (the screen dropped all 16 harmful
# examples from the shipped column, so that column never met them; a report, it chooses nothing)
run rt_long_noscreen $PY bench/redteam.py --families long --methods sbr_pool4@30 "${C[@]}"
run gauge3          $PY bench/gauge.py "${C[@]}"
run gauge_private3  $PY bench/gauge.py --private-probes "${C[@]}"
# the live gauge's share of engine time (4 adapters, default interval), again on this base and from a clean tree
run duty_cycle      $PY bench/serve_overhead.py --duty-cycle
run gauge_all       $PY bench/gauge.py "${C[@]}"
run cond_eval_all   $PY bench/lock_conditional.py eval "${C[@]}"  # adds the later families' SFT adapters
# the price of reading the base: adapter traffic, plain vs the conditional lock reading the adapter / the base
# (an eager LoRA engine in bf16 serves ~5 tokens/s on a 2-core AVX2 box: 16 requests a turn, 4 rounds)
run serve_reads2    $PY bench/serve_overhead.py --adapter-reads --requests 16 --reps 4
run serve_compiled  $PY bench/serve_overhead.py --compiled --requests 16 --reps 4
run serve_eager     $PY bench/serve_overhead.py
run stress          $PY bench/stress.py "${C[@]}"
echo "=== $(date +%T) queue finished"
