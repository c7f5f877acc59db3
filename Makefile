# kvlocal: two commands, `make demo` and `make test`; both do the whole set-up first.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check

.PHONY: setup native deps models demo test bench clean

setup: native deps models

$(VPY):
	$(PYTHON) -m venv $(VENV)

# patched llama.cpp: built once per (llama-cpp-python version, patch hash, flags, CPU) in
# ~/.cache/kvlocal, then installed into the venv's llama_cpp package (KVLOCAL_CUDA=1 for CUDA)
native: $(VPY)
	$(VPY) native/build.py

# kvlocal itself, editable, with `kvlocal serve` and its test tools; needs `native` first so that pip finds
# llama-cpp-python==0.3.36 already installed instead of building a stock copy
deps: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: pyproject.toml | native
	$(PIP) install -q -e '.[server,test]'
	touch $@

models: $(VENV)/.models-stamp
$(VENV)/.models-stamp: models/smollm2.py | deps
	$(VPY) -m models.smollm2
	touch $@

demo: setup
	$(VPY) -m kvlocal.demo -m "$$($(VPY) -m models.smollm2)" -o $(VENV)/demo.kvs

# pytest exits 5 when it collected no tests: a suite that checked nothing is a failure here
test: setup
	@$(VPY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc

# the second evaluation model (optional, never needed by `make test`): gemma3-270m, a base model
GEMMA3_METHODS := am-facts-omp-half:repeat+self-study,am-facts-omp-whole:repeat+self-study,am-facts-omp-names:repeat+self-study,am-facts-omp:repeat+self-study,am-facts:repeat,am-highest:repeat,am-highest:repeat+self-study,am-omp-fast:repeat,truncate,streaming-llm,h2o:context,snapkv:self-study,kvzip:kvzip,kvzip-uniform:kvzip

# the third evaluation model (optional, never needed by `make test`): Qwen2.5-Coder-0.5B, 7 query heads per KV head
QWEN25_METHODS := am-facts-omp-cores-loose:repeat+self-study,am-facts-omp-cores-loose:context,am-facts-omp-cores-quarter:repeat+self-study,am-facts-omp-cores-quarter:context,am-facts-omp-cores-quarter:context+repeat+self-study,am-omp-fast:repeat+self-study,am-highest-anchored:context,h2o:context,snapkv:self-study,truncate
QWEN25_DIAGNOSIS := am-facts-omp-cores-loose:repeat+self-study,am-facts-omp-cores-balanced:repeat+self-study,am-facts-omp-cores-loose:context+repeat+self-study,am-facts-omp-cores-nobeta:repeat+self-study,am-facts-omp-cores-kept:repeat+self-study,h2o:context,snapkv:self-study,truncate

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(VPY) bench/bias_overhead.py
	$(VPY) bench/capture_overhead.py
	$(VPY) bench/compaction_speed.py
	$(VPY) bench/budgets_check.py
	$(VPY) bench/reload.py
	$(VPY) bench/fuzz_sessions.py -n 10000
	$(VPY) bench/niah_diagnosis.py
	$(VPY) bench/facts_diagnosis.py
	$(VPY) bench/facts_heldout.py
	$(VPY) bench/fact_budget.py
	$(VPY) bench/name_needles.py --kinds name
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --out name_needles_heldout
	$(VPY) bench/name_needles.py --kinds words,name,number --methods "am-facts-omp-names,+ numbers in words,truncate,snapkv" \
		--out word_numbers
	$(VPY) bench/name_needles.py --kinds number,name --out whole_numbers \
		--methods "am-facts-omp-names,am-facts-omp-whole,+ whole numbers (2),+ whole numbers (4),+ names beside numbers,truncate,snapkv"
	$(VPY) bench/name_needles.py --kinds name,number --out fact_budget_needles \
		--methods "am-facts-omp-whole,am-facts-omp-half,truncate,snapkv"
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --out fact_budget_needles_heldout \
		--methods "am-facts-omp-whole,am-facts-omp-half,truncate,snapkv"
	$(VPY) bench/fact_cores.py
	$(VPY) bench/after_document.py
	$(VPY) bench/after_document.py -m "$$($(VPY) -m models.gemma3)" --out after_document-gemma3 \
		--rows am-facts-omp-half,am-facts-omp-cores-balanced,truncate,h2o,snapkv
	$(VPY) bench/output_error.py
	$(VPY) bench/name_diagnosis.py
	$(VPY) bench/name_diagnosis.py --stories 5,9 --out name_diagnosis_heldout
	$(VPY) bench/name_needles.py --kinds name,number --methods "am-facts-omp-cores-balanced,+ name units" \
		--out name_units_needles
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --methods "am-facts-omp-cores-balanced,+ name units" \
		--out name_units_needles_heldout
	$(VPY) bench/name_needles.py --kinds name,number --methods "am-facts-omp-cores-balanced,+ name words" \
		--out name_words_needles
	$(VPY) bench/fixed_facts.py
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.gemma3)" --out fixed_facts-gemma3
	$(VPY) bench/name_needles.py --kinds name,number --ratios 5 --out fixed_facts_needles \
		--methods "am-facts-omp-cores-balanced,am-facts-omp-cores-fixed,+ fixed tails"
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --ratios 5 --out fixed_facts_needles_heldout \
		--methods "am-facts-omp-cores-balanced,am-facts-omp-cores-fixed,+ fixed tails"
	$(VPY) bench/output_error.py -m "$$($(VPY) -m models.gemma3)" --out output_error-gemma3
	$(VPY) bench/name_needles.py --kinds name,number --out cores_balanced_needles \
		--methods "am-facts-omp-half,am-facts-omp-balanced,+ cores first,am-facts-omp-cores-balanced,truncate,snapkv"
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --out cores_balanced_needles_heldout \
		--methods "am-facts-omp-half,am-facts-omp-balanced,+ cores first,am-facts-omp-cores-balanced,truncate,snapkv"
	$(VPY) bench/name_needles.py --kinds name,number --out fact_cores_needles \
		--methods "am-facts-omp-half,+ cores first,+ cores first and whole names"
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --out fact_cores_needles_heldout \
		--methods "am-facts-omp-half,+ cores first"
	$(VPY) bench/fact_share.py
	$(VPY) bench/influence_budgets.py
	$(VPY) bench/long_document.py
	$(VPY) bench/streaming_control.py
	$(VPY) bench/online_chats.py
	$(VPY) bench/online_chats.py --methods am-facts-omp-balanced,am-facts-omp-balanced-loose --out online_chats_loose
	$(VPY) bench/name_needles.py --kinds name,number --methods "am-facts-omp-cores-balanced,am-facts-omp-cores-content" \
		--out content_numbers_needles
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-balanced,am-facts-omp-cores-content --ratios 5,10 \
		--sets "grid,held out" --title "A number's core in content words" --out content_cores
	$(VPY) bench/output_error.py --ratios 5 --out anchor_sweep --rows am-facts-omp-cores-loose@0,am-facts-omp-cores-loose@0.01,am-facts-omp-cores-loose,am-facts-omp-cores-balanced,am-facts-omp-cores-loose@10
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose --ratios 5,10,20 \
		--title "The fitted values anchored less to the kept keys' own" --out loose_values
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose --ratios 50 --sets grid \
		--title "The fitted values anchored less to the kept keys' own, 50x" --out loose_values_50
	$(VPY) bench/name_needles.py --kinds name --methods am-facts-omp-cores-balanced,am-facts-omp-cores-loose \
		--out loose_values_names
	$(VPY) bench/name_needles.py --kinds name --stories 5,9 --methods am-facts-omp-cores-balanced,am-facts-omp-cores-loose \
		--out loose_values_names_heldout
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose,am-facts-omp-cores-long \
		--ratios 10 --title "Longer self-study" --out long_self_study
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.gemma3)" --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose \
		--ratios 5,10 --title "The fitted values anchored less to the kept keys' own (gemma3)" --out loose_values-gemma3
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.gemma3)" --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose \
		--ratios 20,50 --sets grid,needles --title "The fitted values anchored less to the kept keys' own (gemma3, 20x and 50x)" \
		--out loose_values-gemma3-high
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.gemma3)" --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose \
		--ratios 20 --sets "held out,second" --out loose_values-gemma3-heldout20 \
		--title "The fitted values anchored less to the kept keys' own (gemma3, held-out articles at 20x)"
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-loose,am-facts-omp-cores-onpolicy --ratios 5,10,20 \
		--sets grid,needles --title "On-policy stages on the default, the same query tokens replayed" --out onpolicy_stages
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-loose,am-facts-omp-cores-late --ratios 5,10 \
		--title "Every query asked after the document in the fit" --out late_queries
	$(VPY) bench/name_needles.py --kinds name --ratios 5 --methods am-facts-omp-cores-loose,am-facts-omp-cores-late \
		--out late_queries_names
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.gemma3)" --rows am-facts-omp-cores-loose,am-facts-omp-cores-late \
		--ratios 5 --sets "grid,held out" --title "Every query asked after the document in the fit (gemma3)" \
		--out late_queries-gemma3
	$(VPY) bench/output_error.py --ratios 5,10 --rows am-facts-omp-cores-loose,am-facts-omp-cores-wide --out wide_fit_error
	$(VPY) bench/fixed_facts.py -m "$$($(VPY) -m models.qwen25)" --rows am-facts-omp-cores-loose --ratios 5,10,20 --sets grid \
		--title "Qwen2.5-Coder-0.5B: the default beside the baselines" --out qwen25_grid
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-loose,am-facts-omp-cores-quarter --ratios 5,10,20 \
		--sets grid,needles --title "The facts at most a quarter of each head's budget (SmolLM2)" --out quarter_facts
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.qwen25)" --parts quality,niah --articles 8,1,2 --ratios 5,10,20 \
		--methods $(QWEN25_METHODS) --out bench/results/qwen25 --notes bench/notes/eval-qwen25.md
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.qwen25)" --parts quality --articles 8,1,2 --ratios 5,10,20 \
		--methods $(QWEN25_DIAGNOSIS) --out bench/results/qwen25-diagnosis
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.qwen25)" --parts quality --articles 0,7,5 --ratios 10 \
		--methods am-facts-omp-cores-loose:repeat+self-study,am-facts-omp-cores-quarter:context,am-highest-anchored:context,h2o:context,snapkv:self-study,truncate \
		--out bench/results/qwen25-heldout
	$(VPY) bench/output_error.py --ratios 5,10,20 --out anchor_sweep_ratios \
		--rows am-facts-omp-cores-loose,am-facts-omp-cores-loose@0.03,am-facts-omp-cores-loose@0.01
	$(VPY) bench/fixed_facts.py --rows am-facts-omp-cores-loose,am-facts-omp-cores-looser --ratios 10,20 \
		--title "The fitted values anchored less again" --out looser_values
	$(VPY) bench/output_error.py --ratios 10,20 --holdout blocks --out anchor_blocks \
		--rows am-facts-omp-cores-loose,am-facts-omp-cores-looser,am-facts-omp-cores-balanced
	$(VPY) bench/output_error.py --ratios 10 --holdout blocks --on-policy --out anchor_on_policy \
		--rows am-facts-omp-cores-loose,am-facts-omp-cores-looser,am-facts-omp-cores-balanced
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts niah --ratios 2,5,10,20 \
		--methods am-highest:repeat,am-facts:repeat,am-facts-full:repeat,am-facts-half:repeat,am-facts-fitted:repeat,truncate,snapkv:self-study \
		--out bench/results/facts-niah
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality --ratios 10,20 \
		--methods am-highest:repeat,am-facts:repeat,am-facts-full:repeat,am-facts-half:repeat,truncate,snapkv:self-study \
		--out bench/results/facts-quality
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality --ratios 10,20 \
		--methods am-facts-omp:repeat+self-study,am-facts:repeat,am-highest:repeat,am-spans-anchored:repeat,am-recall-anchored:repeat+recall,am-highest-anchored:repeat,am-facts-onpolicy:repeat,am-kvzip:kvzip,am-facts:kvzip,kvzip:kvzip,kvzip-uniform:kvzip,truncate,snapkv:self-study \
		--out bench/results/directions
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality --max-queries 0 \
		--methods am-highest:repeat,am-highest:repeat+self-study --ratios 10,20 --out bench/results/all-queries
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality,niah --max-queries 0 \
		--methods am-facts-omp:repeat+self-study --ratios 5,10,20,50 --out bench/results/all-queries-default
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality,niah \
		--methods am-facts-omp:repeat+self-study,am-facts-omp-onpolicy:repeat+self-study,am-facts:repeat,am-facts-onpolicy:repeat,truncate,snapkv:self-study \
		--out bench/results/onpolicy
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.gemma3)" --parts quality,niah \
		--methods $(GEMMA3_METHODS) --out bench/results/gemma3 --notes bench/notes/eval-gemma-3-270m-q4_k_m.md
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.gemma3)" --parts niah --methods $(GEMMA3_METHODS) \
		--out bench/results/gemma3-niah
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts quality,niah --ratios 100,200 \
		--methods am-facts-omp-half:repeat+self-study,am-facts-omp-whole:repeat+self-study,am-facts-omp-names:repeat+self-study,am-facts-omp:repeat+self-study,truncate,streaming-llm,h2o:context,snapkv:self-study \
		--out bench/results/extreme
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --parts summary --summary-no-repeat 0 \
		--methods am-facts-omp:repeat+self-study --ratios 50 --out bench/results/summarize-ngram0
	$(VPY) -m kvlocal eval -m "$$($(VPY) -m models.smollm2)" --out bench/results \
		--notes bench/notes/eval-SmolLM2-135M-Instruct.Q4_1.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
