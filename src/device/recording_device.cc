#include "device/recording_device.h"

namespace agorafs {

RecordingDevice::RecordingDevice(BlockDevice* base) : base_(base) {}

RecordingDevice::RecordingDevice(std::shared_ptr<BlockDevice> base)
    : owned_(std::move(base)), base_(owned_.get()) {}

Status RecordingDevice::Read(uint64_t offset, void* buf, size_t len) {
  return base_->Read(offset, buf, len);
}

Status RecordingDevice::Write(uint64_t offset, const void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  AGFS_RETURN_IF_ERROR(base_->Write(offset, buf, len));
  if (recording_) {
    IoRecord r;
    r.kind = IoRecord::Kind::kWrite;
    r.offset = offset;
    const auto* p = static_cast<const uint8_t*>(buf);
    r.data.assign(p, p + len);
    log_.push_back(std::move(r));
  }
  return Status::Ok();
}

Status RecordingDevice::Flush() {
  std::lock_guard<std::mutex> l(mu_);
  AGFS_RETURN_IF_ERROR(base_->Flush());
  if (recording_) {
    barriers_++;
    IoRecord r;
    r.kind = IoRecord::Kind::kFlush;
    log_.push_back(std::move(r));
  }
  return Status::Ok();
}

uint64_t RecordingDevice::Size() const { return base_->Size(); }

std::string RecordingDevice::Name() const { return "recording:" + base_->Name(); }

uint64_t RecordingDevice::barriers() const {
  std::lock_guard<std::mutex> l(mu_);
  return barriers_;
}

size_t RecordingDevice::records() const {
  std::lock_guard<std::mutex> l(mu_);
  return log_.size();
}

std::vector<IoRecord> RecordingDevice::TakeLog() {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<IoRecord> out;
  out.swap(log_);
  recording_ = false;
  return out;
}

}  // namespace agorafs
