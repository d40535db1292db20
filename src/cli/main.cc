// agorafs command line: mkfs, mount, info, fsck, status, debug corrupt. Thin: every verb calls libagorafs.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "cli/commands.h"
#include "debug/corrupt.h"

int main(int argc, char** argv) {
  using namespace agorafs;
  CLI::App app{"agorafs: a shared-disk cluster filesystem"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "agorafs 0.1.0");

  MkfsArgs mk;
  auto* mkfs = app.add_subcommand("mkfs", "Create a filesystem on DEVICE");
  mkfs->add_option("--nodes", mk.nodes, "Node slots (1..1024)")->default_val(16);
  mkfs->add_option("--journal-size", mk.journal_size, "Journal size per node, e.g. 16M")
      ->default_val("");
  mkfs->add_option("--label", mk.label, "Filesystem label")->default_val("");
  mkfs->add_option("--profile", mk.profile, "Cluster timing profile: default or fast")
      ->check(CLI::IsMember({"default", "fast"}))
      ->default_val("default");
  mkfs->add_option("--size", mk.size, "Create the image file with this size (e.g. 1G)")
      ->default_val("");
  mkfs->add_option("--heartbeat-ms", mk.heartbeat_ms, "Override the profile's heartbeat interval");
  mkfs->add_option("--io-timeout-ms", mk.io_timeout_ms, "Override the profile's I/O timeout");
  mkfs->add_option("--dead-after-ms", mk.dead_after_ms,
                   "Override after how long a silent node is declared dead");
  mkfs->add_flag("--force", mk.force,
                 "Overwrite an existing filesystem, and accept a world-writable device");
  mkfs->add_option("DEVICE", mk.device, "Block device or image file")->required();

  MountArgs mo;
  auto* mount = app.add_subcommand("mount", "Mount DEVICE on MOUNTPOINT");
  mount->add_flag("-f,--foreground", mo.foreground, "Stay in the foreground");
  mount->add_option("-o", mo.options,
                    "Comma-separated: allow_other, cache=SIZE, commit=SECONDS, net=IP:PORT, nonet, "
                    "nointent, poll=MS, hold=MS, attr_timeout=SECONDS, entry_timeout=SECONDS, "
                    "nosuid, nodev, noexec, fsname=NAME, allow_world_writable")
      ->default_val("");
  mount->add_option("DEVICE", mo.device, "Block device or image file")->required();
  mount->add_option("MOUNTPOINT", mo.mountpoint, "Directory to mount on")->required();

  InfoArgs in;
  auto* info = app.add_subcommand("info", "Show the filesystem's layout and state");
  info->add_flag("--json", in.json, "Machine-readable output");
  info->add_option("DEVICE", in.device, "Block device or image file")->required();

  FsckArgs fk;
  auto* fsck = app.add_subcommand("fsck", "Check (and with --repair, repair) a filesystem");
  fsck->add_flag("--repair", fk.repair, "Repair what is found");
  fsck->add_flag("--json", fk.json, "Machine-readable report");
  fsck->add_option("DEVICE", fk.device, "Block device or image file")->required();

  StatusArgs sa;
  auto* status = app.add_subcommand(
      "status", "Show the cluster: nodes, heartbeats, lock master, who holds and waits for what");
  status->add_flag("--json", sa.json, "Machine-readable output");
  status->add_option("--sample-ms", sa.sample_ms, "How long to watch heartbeats (default: one interval)");
  status->add_option("DEVICE", sa.device, "Block device, image file or nbd URI")->required();

  CorruptArgs ca;
  auto* debug = app.add_subcommand("debug", "Tools for testing: damage an image on purpose");
  debug->require_subcommand(1);
  auto* corrupt = debug->add_subcommand(
      "corrupt", "Damage metadata blocks of a chosen type in an unmounted image; prints them");
  corrupt->add_option("--type", ca.type, "Metadata type")
      ->check(CLI::IsMember(MetaKindNames()));
  corrupt->add_option("--count", ca.count, "How many blocks to damage")->default_val(1);
  corrupt->add_option("--mode", ca.mode, "flip: flip random bits; zero: zero the block")
      ->check(CLI::IsMember({"flip", "zero"}))
      ->default_val("flip");
  corrupt->add_option("--bits", ca.bits, "Bits flipped per block (flip mode)")->default_val(4);
  corrupt->add_option("--seed", ca.seed, "Random seed (which blocks, which bits)")->default_val(1);
  corrupt->add_option("--ino", ca.ino, "Only blocks owned by this inode");
  corrupt->add_option("--block", ca.block, "Only this block");
  corrupt->add_flag("--json", ca.json, "Machine-readable output");
  corrupt->add_option("DEVICE", ca.device, "Image file, block device or nbd URI")->required();

  CLI11_PARSE(app, argc, argv);
  if (mkfs->parsed()) return RunMkfs(mk);
  if (mount->parsed()) return RunMount(mo);
  if (info->parsed()) return RunInfo(in);
  if (fsck->parsed()) return RunFsck(fk);
  if (status->parsed()) return RunStatus(sa);
  if (corrupt->parsed()) return RunCorrupt(ca);
  return 2;
}
