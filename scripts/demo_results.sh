#!/usr/bin/env bash
# Reproduce the committed demo results (results/README.md): fft, lora, molf and molf_e on a tiny
# Qwen2 with the bundled MedMCQA and CounterFact samples, the embedded default, then the routing
# figures and the tables. CPU, offline, about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=runs/modes
rm -rf "$runs" runs/demo_default results/demo results/demo_default
base=(--model_name_or_path tiny-qwen2 --per_device_batch_size 8 --lr_scheduler_type cosine --warm_up_ratio 0.1
      --seed 42 --logging_steps 5 --report_to json --save_strategy "no" --ckpt_dir_root "$runs"
      --results_dir results/demo --eval_batch_size 16)
med=(--dataset_type med --data_path assets/data/med --eval_data_path assets/data/med --max_seq_length 256
     --num_train_epochs 1 --max_new_tokens 4)
fact=(--dataset_type fact --data_path assets/data/fact/counterfact.jsonl --num_train_epochs 5
      --gradient_accumulation_steps 1)

train_all_modes() {  # $1: lora lr; the rest: task flags
    local lora_lr=$1; shift
    python src/script/train.py "${base[@]}" "$@" --mode fft --learning_rate 1e-3 --weight_decay 0.1
    python src/script/train.py "${base[@]}" "$@" --mode lora --lora_rank 16 --lora_learning_rate "$lora_lr" \
        --lora_weight_decay 0.01
    python src/script/train.py "${base[@]}" "$@" --mode molf --molf_lora_ranks "[16]" --learning_rate 1e-3 \
        --weight_decay 0.1 --lora_learning_rate "$lora_lr" --lora_weight_decay 0.01
    python src/script/train.py "${base[@]}" "$@" --mode molf_e --molf_lora_ranks "[8,16]" \
        --lora_learning_rate "$lora_lr" --lora_weight_decay 0.01
}

train_all_modes 1.5e-3 "${med[@]}"
train_all_modes 3e-3 "${fact[@]}"
python src/script/train.py --config_path configs/demo.yaml --ckpt_dir_root runs/demo_default \
    --results_dir results/demo_default

python scripts/plot_routing.py runs/demo_default/molf_* -o results/figures/demo
python scripts/plot_routing.py "$runs"/molf_tiny-qwen2_fact_* -o results/figures/molf_fact
python scripts/plot_routing.py "$runs"/molf_e_tiny-qwen2_fact_* -o results/figures/molf_e_fact
python scripts/make_tables.py results/demo/fact.csv -o results/tables
rm -f results/*/*.lock
