"""Push and pull through the real huggingface_hub client against a loopback fake Hub (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hub_server import fake_hub  # noqa: F401  (pytest fixture)
from safety_peft.compare import compare_masks
from safety_peft.errors import MaskFileError, SafetyPeftError
from safety_peft.hub import (
    HubError,
    HubNotFoundError,
    card_text,
    download_artifact_file,
    upload_artifact_folder,
)
from safety_peft.masks import SafetyMasks

REPO = "my-org/tiny-safety-masks"


def make_artifact(folder: Path, value: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"m": torch.full((4, 8), value, dtype=torch.uint8)}, str(folder / "safety_masks.safetensors"))
    card = card_text("# Safety masks\n\n| layer | locked |\n|---|---|\n| q_proj | 3 |",
                     base_model="HuggingFaceTB/SmolLM2-135M-Instruct", tags=["safety", "masks"])
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "single-commit-upload"])
def test_push_then_pull_by_repo_id(fake_hub, tmp_path, monkeypatch, xet):  # noqa: F811
    # huggingface_hub takes a different upload path when hf_xet is installed: both must work.
    import huggingface_hub.hf_api
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: xet)
    folder = make_artifact(tmp_path / "masks")
    before = snapshot(folder)

    url = upload_artifact_folder(folder, REPO, commit_message="first masks")

    head = fake_hub.repo(REPO).branches["main"]
    assert url == f"{fake_hub.endpoint}/{REPO}/commit/{head}"
    assert fake_hub.repo(REPO).commits[head].title == "first masks"
    assert snapshot(folder) == before  # pushing only reads the folder
    remote = fake_hub.files(REPO)
    assert remote["safety_masks.safetensors"] == (folder / "safety_masks.safetensors").read_bytes()
    meta = front_matter(remote["README.md"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "safety-peft"
    assert {"safety-peft", "safety", "masks"} <= set(meta["tags"])
    assert fake_hub.validated_yaml, "the client validates the card metadata before committing"

    path = download_artifact_file(REPO, "safety_masks.safetensors")
    assert Path(path).is_relative_to(os.environ["HF_HUB_CACHE"])
    assert torch.equal(load_file(path)["m"], torch.ones(4, 8, dtype=torch.uint8))


def test_unchanged_push_makes_no_new_commit(fake_hub, tmp_path):  # noqa: F811
    folder = make_artifact(tmp_path / "masks")
    first = upload_artifact_folder(folder, REPO)
    n_commits = len(fake_hub.repo(REPO).commits)
    assert upload_artifact_folder(folder, REPO) == first
    assert len(fake_hub.repo(REPO).commits) == n_commits


def test_revisions_are_branches_made_on_demand_and_pulled_by_name_or_commit(fake_hub, tmp_path):  # noqa: F811
    upload_artifact_folder(make_artifact(tmp_path / "v1", value=1), REPO)
    url = upload_artifact_folder(make_artifact(tmp_path / "v2", value=2), REPO, revision="v2")
    v2_commit = url.rsplit("/", 1)[-1]
    assert fake_hub.repo(REPO).branches["v2"] == v2_commit

    def pulled(**kw):
        return int(load_file(download_artifact_file(REPO, "safety_masks.safetensors", **kw))["m"][0, 0])

    assert pulled() == 1
    assert pulled(revision="main") == 1
    assert pulled(revision="v2") == 2
    assert pulled(revision=v2_commit) == 2
    # pushing to the existing branch again moves it forward
    upload_artifact_folder(make_artifact(tmp_path / "v3", value=3), REPO, revision="v2")
    assert pulled(revision="v2") == 3
    assert pulled(revision=v2_commit) == 2


def test_offline_load_from_cache(fake_hub, tmp_path, monkeypatch):  # noqa: F811
    upload_artifact_folder(make_artifact(tmp_path / "m", value=1), REPO)
    upload_artifact_folder(make_artifact(tmp_path / "b", value=2), REPO, revision="v2")
    online_main = download_artifact_file(REPO, "safety_masks.safetensors")
    online_v2 = download_artifact_file(REPO, "safety_masks.safetensors", revision="v2")
    n_requests = len(fake_hub.requests)

    # explicit local_files_only, and HF_HUB_OFFLINE set after import: no request at all
    assert download_artifact_file(REPO, "safety_masks.safetensors", local_files_only=True) == online_main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_artifact_file(REPO, "safety_masks.safetensors", revision="v2") == online_v2
    assert len(fake_hub.requests) == n_requests
    with pytest.raises(HubNotFoundError) as info:
        download_artifact_file(REPO, "never_downloaded.json")
    assert info.value.kind == "cache" and "offline" in str(info.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    # the Hub goes away: branches resolve to the commits cached for them
    fake_hub.stop()
    assert download_artifact_file(REPO, "safety_masks.safetensors") == online_main
    assert download_artifact_file(REPO, "safety_masks.safetensors", revision="v2") == online_v2
    assert int(load_file(online_v2)["m"][0, 0]) == 2


@pytest.mark.parametrize("repo_exists", [False, True])
def test_refused_push_says_why_and_leaves_folder_untouched(fake_hub, tmp_path, repo_exists):  # noqa: F811
    if repo_exists:
        fake_hub.create_repo(REPO)
    folder = make_artifact(tmp_path / "masks")
    before = snapshot(folder)
    fake_hub.refuse_writes = True

    with pytest.raises(HubError) as info:
        upload_artifact_folder(folder, REPO)

    err = info.value
    assert isinstance(err, SafetyPeftError) and isinstance(err, OSError)
    assert err.status == 403 and err.repo_id == REPO
    assert REPO in str(err) and "403" in str(err) and "You don't have the rights" in str(err)
    assert "not changed" in str(err)
    assert snapshot(folder) == before
    assert fake_hub.repo(REPO) is None or set(fake_hub.files(REPO)) == {".gitattributes"}


def test_push_to_unreachable_hub_says_so(fake_hub, tmp_path):  # noqa: F811
    folder = make_artifact(tmp_path / "masks")
    before = snapshot(folder)
    fake_hub.stop()
    with pytest.raises(HubError, match="could not reach the Hub") as info:
        upload_artifact_folder(folder, REPO)
    assert info.value.status is None
    assert snapshot(folder) == before


def test_token_is_sent_and_private_repos_need_it(fake_hub, tmp_path):  # noqa: F811
    fake_hub.token = "hf_test_token"
    folder = make_artifact(tmp_path / "masks")
    with pytest.raises(HubError) as info:
        upload_artifact_folder(folder, REPO, token=False)
    assert info.value.status == 401

    upload_artifact_folder(folder, REPO, private=True, token="hf_test_token")
    assert fake_hub.repo(REPO).private
    assert fake_hub.write_requests()[-1].authorization == "Bearer hf_test_token"
    with pytest.raises(HubNotFoundError) as info:
        download_artifact_file(REPO, "README.md", token=False)
    assert info.value.kind == "repo"
    assert Path(download_artifact_file(REPO, "README.md", token="hf_test_token")).read_bytes() == (
        folder / "README.md"
    ).read_bytes()


def test_missing_repo_revision_or_file_is_a_clear_mask_file_error(fake_hub, tmp_path):  # noqa: F811
    upload_artifact_folder(make_artifact(tmp_path / "masks"), REPO)
    cases = [
        (dict(repo_id="my-org/nope", filename="README.md"), "repo", "no repo 'my-org/nope'"),
        (dict(repo_id=REPO, filename="README.md", revision="v9"), "revision", "no revision 'v9'"),
        (dict(repo_id=REPO, filename="other.safetensors"), "file", "no file 'other.safetensors'"),
    ]
    for kwargs, kind, words in cases:
        with pytest.raises(MaskFileError, match=words) as info:
            download_artifact_file(**kwargs)
        assert isinstance(info.value, HubNotFoundError) and info.value.kind == kind
        assert info.value.status == 404


def test_bad_push_arguments_fail_before_any_request(fake_hub, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError):
        upload_artifact_folder(tmp_path / "missing", REPO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no file"):
        upload_artifact_folder(tmp_path / "empty", REPO)
    with pytest.raises(ValueError, match="commit hash"):
        upload_artifact_folder(make_artifact(tmp_path / "m"), REPO, revision="a" * 40)
    assert fake_hub.requests == []


# ---------------------------------------------------------------------------------------- SafetyMasks
def tiny_masks(seed: int) -> SafetyMasks:
    g = torch.Generator().manual_seed(seed)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    return SafetyMasks({n: torch.rand(16, 32, generator=g) < 0.1 for n in names},
                       provenance={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "method": "wanda",
                                   "sparsity": 0.1, "seed": seed})


def test_safety_masks_round_trip_through_the_hub_by_revision_and_offline(fake_hub, tmp_path):  # noqa: F811
    v1, v2 = tiny_masks(1), tiny_masks(2)
    v1.push_to_hub(REPO, commit_message="masks v1")
    v2.push_to_hub(REPO, revision="v2")

    assert SafetyMasks.from_pretrained(REPO) == v1
    assert SafetyMasks.from_pretrained(REPO, revision="v2") == v2
    assert SafetyMasks.from_pretrained(REPO, revision="v2").provenance["seed"] == 2
    card = fake_hub.files(REPO)["README.md"]
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "safety-peft" and "safety-peft" in meta["tags"]
    assert b"model.layers.1.mlp.down_proj.weight" in card  # the per-layer table

    fake_hub.stop()
    assert SafetyMasks.from_pretrained(REPO, revision="v2") == v2
    assert SafetyMasks.from_pretrained(REPO, local_files_only=True) == v1


def test_refused_masks_push_leaves_the_saved_artifact_loadable(fake_hub, tmp_path):  # noqa: F811
    masks = tiny_masks(1)
    folder = tmp_path / "masks"
    masks.save_pretrained(folder)
    before = snapshot(folder)
    fake_hub.refuse_writes = True
    with pytest.raises(HubError, match="403"):
        upload_artifact_folder(folder, REPO)
    with pytest.raises(HubError, match="403"):
        masks.push_to_hub(REPO)
    assert snapshot(folder) == before
    assert SafetyMasks.from_pretrained(folder) == masks


def test_drift_report_push(fake_hub, tmp_path):  # noqa: F811
    before, after = tiny_masks(1), tiny_masks(2)
    report = compare_masks(before, after)
    url = report.push_to_hub("my-org/drift", commit_message="drift after SFT")
    remote = fake_hub.files("my-org/drift")
    assert url.endswith(fake_hub.repo("my-org/drift").branches["main"])
    assert {"README.md", "drift.json", "drift.md", "jaccard_by_depth.png", "overlap_by_depth.png",
            "by_module.png"} <= set(remote)
    assert json.loads(remote["drift.json"]) == report.to_dict()
    meta = front_matter(remote["README.md"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"safety-peft", "drift-report"} <= set(meta["tags"])
    assert b"## Per weight" in remote["README.md"]
    assert list(tmp_path.iterdir()) == []  # nothing written locally
