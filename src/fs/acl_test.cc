// The ACL codec and the ACL/mode rules, against values the kernel and setfacl produce.
#include "fs/acl.h"

#include <sys/stat.h>

#include <gtest/gtest.h>

namespace agorafs::acl {
namespace {

// user::rw-, user:1000:r-x, group::r--, group:50:rw-, mask::rwx, other::---
Acl Full() {
  return {{kUserObj, 6, kUndefinedId}, {kUser, 5, 1000},      {kGroupObj, 4, kUndefinedId},
          {kGroup, 6, 50},             {kMask, 7, kUndefinedId}, {kOther, 0, kUndefinedId}};
}

TEST(AclTest, EncodeMatchesKernelLayout) {
  std::string v = Encode({{kUserObj, 7, kUndefinedId}, {kUser, 4, 1000}});
  // version 2, then tag/perm/id little-endian.
  const unsigned char want[] = {2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff,
                                2, 0, 4, 0, 0xe8, 3, 0, 0};
  ASSERT_EQ(v.size(), sizeof(want));
  EXPECT_EQ(v, std::string(reinterpret_cast<const char*>(want), sizeof(want)));
}

TEST(AclTest, RoundTripAndEmpty) {
  auto r = Decode(Encode(Full()));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Full());
  auto e = Decode(Encode({}));
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->empty());
}

TEST(AclTest, RejectsWhatTheKernelRejects) {
  auto bad = [](Acl a) { return Decode(Encode(a)).status().Is(Code::kInvalid); };
  EXPECT_TRUE(Decode("").status().Is(Code::kInvalid));
  EXPECT_TRUE(Decode(std::string("\2\0\0\0\1\0", 6)).status().Is(Code::kInvalid));
  EXPECT_TRUE(Decode(std::string("\3\0\0\0", 4)).status().Is(Code::kInvalid));
  // Missing owner / group / other.
  EXPECT_TRUE(bad({{kGroupObj, 4, kUndefinedId}, {kOther, 0, kUndefinedId}}));
  EXPECT_TRUE(bad({{kUserObj, 4, kUndefinedId}, {kOther, 0, kUndefinedId}}));
  EXPECT_TRUE(bad({{kUserObj, 4, kUndefinedId}, {kGroupObj, 4, kUndefinedId}}));
  // Named entry without a mask.
  EXPECT_TRUE(bad({{kUserObj, 6, kUndefinedId}, {kUser, 4, 7}, {kGroupObj, 4, kUndefinedId},
                   {kOther, 0, kUndefinedId}}));
  // Out of order, duplicate ids, bad perms, unknown tag.
  EXPECT_TRUE(bad({{kGroupObj, 4, kUndefinedId}, {kUserObj, 6, kUndefinedId},
                   {kOther, 0, kUndefinedId}}));
  EXPECT_TRUE(bad({{kUserObj, 6, kUndefinedId}, {kUser, 4, 9}, {kUser, 4, 9},
                   {kGroupObj, 4, kUndefinedId}, {kMask, 7, kUndefinedId}, {kOther, 0, kUndefinedId}}));
  EXPECT_TRUE(bad({{kUserObj, 8, kUndefinedId}, {kGroupObj, 4, kUndefinedId}, {kOther, 0, kUndefinedId}}));
  EXPECT_TRUE(bad({{kUserObj, 6, kUndefinedId}, {0x40, 4, kUndefinedId}, {kGroupObj, 4, kUndefinedId},
                   {kOther, 0, kUndefinedId}}));
  // A mask alone (no named entries) is valid, as in the kernel.
  EXPECT_TRUE(Decode(Encode({{kUserObj, 6, kUndefinedId}, {kGroupObj, 4, kUndefinedId},
                             {kMask, 4, kUndefinedId}, {kOther, 0, kUndefinedId}}))
                  .ok());
}

TEST(AclTest, MinimalAndModeBits) {
  EXPECT_TRUE(IsMinimal(FromMode(0754)));
  EXPECT_EQ(PermBits(FromMode(0754)), 0754u);
  EXPECT_FALSE(IsMinimal(Full()));
  // The group bits come from the mask, not the owning group entry.
  EXPECT_EQ(PermBits(Full()), 0670u);
}

TEST(AclTest, ChmodRewritesOwnerMaskOther) {
  Acl a = Full();
  Chmod(&a, 0751);
  EXPECT_EQ(a[0].perm, 7);  // owner
  EXPECT_EQ(a[1].perm, 5);  // named user untouched
  EXPECT_EQ(a[2].perm, 4);  // owning group untouched: the mask stands for the group class
  EXPECT_EQ(a[4].perm, 5);  // mask
  EXPECT_EQ(a[5].perm, 1);  // other
  Acl m = FromMode(0600);
  Chmod(&m, 0640);
  EXPECT_EQ(PermBits(m), 0640u);
}

TEST(AclTest, CreateMasqLimitsByRequestedMode) {
  Acl a = Full();
  uint32_t mode = S_IFREG | 0644;  // what open(O_CREAT, 0644) asks for
  CreateMasq(&a, &mode);
  EXPECT_EQ(mode, uint32_t(S_IFREG | 0640));  // owner rw, mask r (rwx & r--), other none
  EXPECT_EQ(a[4].perm, 4);
  EXPECT_EQ(a[1].perm, 5);  // named entries stay; the mask limits them
  uint32_t dmode = S_IFDIR | S_ISGID | 0777;
  Acl d = FromMode(0750);
  CreateMasq(&d, &dmode);
  EXPECT_EQ(dmode, uint32_t(S_IFDIR | S_ISGID | 0750));
}

}  // namespace
}  // namespace agorafs::acl
