"""The attribute CNN trained on a built-in world's training shards, scored on its held-out
combinations' images (generate_world split=heldout): what it would do on a user's unseen pairs."""
import json, sys, time
import torch
torch.set_num_threads(1)
from ctrak.toy.world_shards import generate_world
from ctrak.toy.labelled import load_labelled
from ctrak.toy.classifier import classifier_for
out = {}
for world, n in (("paper", 1200), ("wide", 2400)):
    train_dir, held_dir = f"runs/cnn/{world}-train", f"runs/cnn/{world}-heldout"
    generate_world(world, train_dir, num_images=n, image_size=24, seed=0)
    generate_world(world, held_dir, num_images=400, image_size=24, seed=0, split="heldout")
    t0 = time.time()
    data = load_labelled(train_dir, "shape,colour")
    clf = classifier_for(data, None)
    from ctrak.toy.world_shards import read_samples
    rows = list(read_samples(held_dir))
    x = torch.stack([torch.tensor(r["image"]).permute(2, 0, 1) for r in rows]).float() / 127.5 - 1
    truth = [(r["labels"]["shape"], r["labels"]["colour"]) for r in rows]
    pred = clf.predict(x)
    acc = {a: sum(p[j] == t[j] for p, t in zip(pred, truth)) / len(pred) for j, a in enumerate(clf.attributes)}
    both = sum(p == t for p, t in zip(pred, truth)) / len(pred)
    out[world] = {"split_accuracy": clf.accuracy, "heldout_combo_accuracy": acc, "heldout_both": both, "n_heldout": len(pred), "s": round(time.time() - t0, 1)}
    print(world, out[world], flush=True)
json.dump(out, open("runs/cnn_heldout.json", "w"), indent=1)
