"""The cloud operations: VMs, their shell scripts, GCS staging, local clusters, the venv.

  plan          launch.submit's flags -> a Plan: uploads and exact gcloud commands
  execute       carries a Plan out (or prints it for --dry_run)
  remote        the shell scripts a Plan runs on the VMs over ssh
  accelerators  the TPU and GPU machine shapes launch.submit knows
  gcs           google-cloud-storage: buckets, uploads, runs
  cluster       a supervised multi-worker cluster on this machine (launch.cluster)
  bootstrap     the repo-local venv the README commands create and run in

Nothing is imported here: bootstrap runs under the bare system python3 of a
fresh clone, so importing this package must not need anything installed.
"""
