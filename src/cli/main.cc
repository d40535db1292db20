#include <CLI/CLI.hpp>

int main(int argc, char** argv) {
  CLI::App app{"agorafs: a shared-disk cluster filesystem"};
  app.require_subcommand(1);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
