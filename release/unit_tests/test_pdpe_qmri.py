"""Model-zoo unit test of the pdpe_qmri bundle, in the shape of the zoo's ``ci/unit_tests/test_<bundle>.py``.

Runs the bundle's train, evaluate and inference workflows for real on small data the bundle generates itself
(a coarse phantom cohort and a DICOM sample study), with ``check_properties`` on each, as the zoo's
``check_workflow`` does. The bundle folder comes from ``BUNDLE_ROOT`` (default ``models/pdpe_qmri``, the zoo
repository layout) and is put on ``sys.path`` for its custom code, as the zoo's runner does.

    BUNDLE_ROOT=/path/to/pdpe_qmri python -m unittest test_pdpe_qmri.py
"""

import json
import os
import shutil
import sys
import tempfile
import unittest

from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = os.path.abspath(os.environ.get("BUNDLE_ROOT", "models/pdpe_qmri"))
sys.path.insert(0, BUNDLE_ROOT)

#: A small network on a coarse grid, so that one training epoch takes seconds on a CPU.
TINY = {
    "spatial_size": [64, 64],
    "network_pixdim": [4.0, 4.0, 0.0],
    "network_def#channels": [8, 16, 32],
    "network_def#embed_dim": 8,
    "slices_per_volume": 2,
    "volumes_per_batch": 2,
    "num_workers": 0,
    "epochs": 1,
}


def check_workflow(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    problems = workflow.check_properties()
    if problems:
        raise AssertionError(f"missing or wrong workflow properties: {problems}")
    workflow.run()
    workflow.finalize()


class TestPDPEQMRI(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from scripts.phantom import generate_cohort
        from scripts.sample_study import write_sample_study

        cls.work = tempfile.mkdtemp()
        cls.cohort = os.path.join(cls.work, "cohort")
        generate_cohort(cls.cohort, n_subjects=6, seed=0, voxel_size=(4.0, 4.0, 8.0), family_size=1)
        cls.study = write_sample_study(os.path.join(cls.work, "sample"), seed=0, voxel_size=(4.0, 4.0, 6.0))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work)

    def _configs(self, *names):
        return [os.path.join(BUNDLE_ROOT, "configs", name) for name in names]

    def _workflow(self, configs, workflow_type, **override):
        return ConfigWorkflow(
            config_file=configs,
            workflow_type=workflow_type,
            meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
            logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
            **override,
        )

    def test_1_train_then_evaluate(self):
        models, runs = os.path.join(self.work, "models"), os.path.join(self.work, "runs")
        override = {**TINY, "dataset_dir": self.cohort, "ckpt_dir": models, "output_dir": runs}
        check_workflow(self._workflow(self._configs("train.json"), "train", **override))
        self.assertTrue(os.path.isfile(os.path.join(models, "model.pt")))

        evaluation = {**override, "output_dir": os.path.join(self.work, "eval")}
        check_workflow(self._workflow(self._configs("train.json", "evaluate.json"), "train", **evaluation))
        with open(os.path.join(self.work, "eval", "metrics.csv")) as f:
            self.assertIn("psnr_sum", f.read())

    def test_2_infer(self):
        out = os.path.join(self.work, "maps")
        override = {"study_dir": str(self.study["dicom"]), "output_dir": out, "handlers#0#_disabled_": True}
        check_workflow(self._workflow(self._configs("inference.json"), "infer", **override))  # untrained weights
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        self.assertEqual(report["units"]["T1"], "ms")
        for name in ("T1_map.nii.gz", "T2_map.nii.gz", "PD_map.nii.gz", "mask.nii.gz"):
            self.assertTrue(os.path.isfile(os.path.join(out, name)), name)


if __name__ == "__main__":
    unittest.main()
